import json

import pytest

from nnunetv2_gfscreen.plans.cli import add_gfscreen_configuration
from nnunetv2_gfscreen.plans.settings import GFScreenSettings


def test_defaults_follow_the_method():
    s = GFScreenSettings()
    assert (s.group_size, s.alpha, s.beta, s.clip_eps, s.glance_lr) == (16, 0.1, 0.01, 0.1, 3e-4)


def test_overrides_are_cast_and_validated():
    s = GFScreenSettings.from_configuration({"gfscreen": {"group_size": "8", "alpha": 0}})
    assert s.group_size == 8 and isinstance(s.group_size, int) and s.alpha == 0.0
    with pytest.raises(ValueError, match="unknown GF-Screen setting.*groupsize"):
        GFScreenSettings.from_dict({"groupsize": 8})
    with pytest.raises(ValueError, match="group_size=1"):
        GFScreenSettings.from_dict({"group_size": 1})
    with pytest.raises(ValueError, match="must be an integer"):
        GFScreenSettings.from_dict({"group_size": 4.5})
    with pytest.raises(ValueError, match="lesion_share"):
        GFScreenSettings.from_dict({"lesion_share": 1.5})


def test_configuration_without_block_gets_defaults():
    assert GFScreenSettings.from_configuration({"patch_size": [1, 2, 3]}) == GFScreenSettings()


def _plans(tmp_path):
    f = tmp_path / "plans.json"
    f.write_text(json.dumps({"configurations": {"3d_fullres": {"patch_size": [48, 224, 192]}}}))
    return f


def test_plan_command_adds_inheriting_configuration(tmp_path):
    f = _plans(tmp_path)
    add_gfscreen_configuration(str(f), overrides={"group_size": 8})
    conf = json.loads(f.read_text())["configurations"]["3d_fullres_gfscreen"]
    assert conf["inherits_from"] == "3d_fullres"
    assert conf["gfscreen"]["group_size"] == 8 and conf["gfscreen"]["beta"] == 0.01
    with pytest.raises(FileExistsError):
        add_gfscreen_configuration(str(f))
    with pytest.raises(ValueError, match="not in"):
        add_gfscreen_configuration(str(f), source_configuration="2d")


def test_plans_manager_resolves_the_gfscreen_configuration(planned_dataset):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    conf = PlansManager(str(planned_dataset["plans_file"])).get_configuration("3d_fullres_gfscreen")
    assert GFScreenSettings.from_configuration(conf.configuration).group_size == 4
    assert conf.data_identifier == "nnUNetPlans_3d_fullres"  # reuses the 3d_fullres preprocessed data


def test_renamed_calibration_target_is_refused_with_its_new_name(tmp_path):
    assert GFScreenSettings().target_lesion_sensitivity == 0.98
    assert GFScreenSettings.from_dict({"target_lesion_sensitivity": "0.9"}).target_lesion_sensitivity == 0.9
    with pytest.raises(ValueError, match="target_tile_sensitivity.*target_lesion_sensitivity"):
        GFScreenSettings.from_dict({"target_tile_sensitivity": 0.98})
    with pytest.raises(ValueError, match="target_lesion_sensitivity"):  # nnUNetv2_gfscreen_plan --set
        add_gfscreen_configuration(str(_plans(tmp_path)), overrides={"target_tile_sensitivity": "0.9"})
    # an existing model's plans (written before the rename) still rebuild the network for inference
    with pytest.warns(UserWarning, match="target_tile_sensitivity"):
        old = GFScreenSettings.from_configuration({"gfscreen": {"group_size": 8, "target_tile_sensitivity": 0.9}})
    assert old.group_size == 8 and old.target_lesion_sensitivity == 0.98


def test_the_training_docs_list_every_setting_with_its_default():
    """docs/training.md's settings table is the dataclass's: every key, with its default."""
    import re
    from dataclasses import fields
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| ([^|]+) \|", text, flags=re.M))
    for f in fields(GFScreenSettings):
        assert f.name in rows, f"docs/training.md lacks the setting {f.name}"
        assert float(rows[f.name].strip()) == float(f.default), (f.name, rows[f.name], f.default)
