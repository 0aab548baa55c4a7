"""Retrofit pieces without training: -pretrained_weights into the Focus, the Focus cache and its alignment with the
group tiles, the Glance-only step, and the model folders the retrofit refuses."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gfscreen_lab.experiments.cpu_plans import CPU_ARCH_KWARGS, shrink_configuration_for_cpu
from tests.nnunet_fixtures import PATCH

PLANS = "nnUNetPlansRetroUnits"
CONFIG = "3d_fullres"


@pytest.fixture(scope="module")
def retro(planned_dataset, tmp_path_factory):
    """A CPU-sized plans file without a gfscreen block and a plain nnU-Net model folder with random weights."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pre = planned_dataset["dataset_folder"]
    plans = shrink_configuration_for_cpu(json.loads(planned_dataset["plans_file"].read_text()), CONFIG, PATCH,
                                         CPU_ARCH_KWARGS, batch_size=2)
    plans["plans_name"] = PLANS
    plans["configurations"] = {CONFIG: plans["configurations"][CONFIG]}
    (pre / f"{PLANS}.json").write_text(json.dumps(plans, indent=2))
    dataset_json = json.loads((pre / "dataset.json").read_text())
    pm = PlansManager(plans)
    lm = pm.get_label_manager(dataset_json)
    torch.manual_seed(0)
    net = nnUNetTrainer.build_network_architecture(pm, pm.get_configuration(CONFIG), 1,
                                                   lm.num_segmentation_heads, True)
    results = tmp_path_factory.mktemp("results") / pre.name
    model = results / f"nnUNetTrainer__{PLANS}__{CONFIG}"
    (model / "fold_0").mkdir(parents=True)
    (model / "plans.json").write_text(json.dumps(plans))
    (model / "dataset.json").write_text(json.dumps(dataset_json))
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer"},
               model / "fold_0" / "checkpoint_final.pth")
    return {**planned_dataset, "plans": plans, "dataset_json": dataset_json, "results": results, "model": model,
            "checkpoint": str(model / "fold_0" / "checkpoint_final.pth"), "source": net.state_dict()}


def _trainer(cls, retro, monkeypatch, tmp_path):
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    monkeypatch.setenv("nnUNet_preprocessed", str(retro["root"] / "preprocessed"))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    trainer = cls({**retro["plans"], "continue_training": False}, CONFIG, 0, retro["dataset_json"], torch.device("cpu"))
    trainer.initialize()
    return trainer


def test_pretrained_weights_from_a_plain_checkpoint_go_into_the_focus(retro, monkeypatch, tmp_path):
    import nnunetv2.run.run_training as rt
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2_gfscreen.trainers import GFScreenTrainer
    trainer = _trainer(GFScreenTrainer, retro, monkeypatch, tmp_path)
    net = trainer._gfscreen_network()
    with pytest.raises(AssertionError, match="missing in the pretrained"):      # nnU-Net's own loader
        load_pretrained_weights(trainer.network, retro["checkpoint"])
    glance = {k: v.clone() for k, v in net.glance.state_dict().items()}
    rt.maybe_load_checkpoint(trainer, False, False, retro["checkpoint"])       # what nnUNetv2_train -pretrained_weights runs
    focus = net.focus.state_dict()
    for k, v in retro["source"].items():
        if ".seg_layers." not in k:
            assert torch.equal(focus[k], v), k
        elif k.endswith(".weight"):                                            # nnU-Net's rule: seg layers start fresh
            assert not torch.equal(focus[k], v), k
    assert all(torch.equal(glance[k], v) for k, v in net.glance.state_dict().items())


def test_retrofit_step_reads_rewards_from_the_cache_and_trains_only_the_glance(retro, monkeypatch, tmp_path):
    import nnunetv2.run.run_training as rt
    from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
    from gfscreen_lab.trainers import GFScreenTrainer_Retrofit_Tiny
    from nnunetv2_gfscreen.trainers.focus_cache import cache_fingerprint, load_foreground
    trainer = _trainer(GFScreenTrainer_Retrofit_Tiny, retro, monkeypatch, tmp_path)
    with pytest.raises(RuntimeError, match="no Focus was loaded"):
        trainer.on_train_start()
    rt.maybe_load_checkpoint(trainer, False, False, retro["checkpoint"])
    net = trainer._gfscreen_network()
    assert all(torch.equal(net.focus.state_dict()[k], v) for k, v in retro["source"].items())  # seg layers too
    trainer.focus_files = trainer.prepare_focus_cache()
    tr_keys = set(trainer.do_split()[0])
    assert set(trainer.focus_files) == tr_keys
    folder = Path(next(iter(trainer.focus_files.values()))).parent
    assert json.loads((folder / "cache.json").read_text())["fingerprint"] == \
        cache_fingerprint(net.focus, trainer.configuration_manager.patch_size, trainer.gfscreen.tile_step_size)
    mtimes = {k: os.path.getmtime(f) for k, f in trainer.focus_files.items()}
    assert trainer.prepare_focus_cache() == trainer.focus_files                  # reused, not recomputed
    assert mtimes == {k: os.path.getmtime(f) for k, f in trainer.focus_files.items()}

    dl_tr, _ = trainer.get_dataloaders()
    batch = next(dl_tr)
    assert "data" not in batch                                                   # no Focus batch is drawn
    size = trainer.configuration_manager.patch_size
    n = trainer.gfscreen.group_size
    for i, start in enumerate(batch["group_starts"]):
        cached = load_foreground(trainer.focus_files[batch["group_keys"][i // n]])[None].astype(np.uint8)
        box = [[s, s + p] for s, p in zip(start, size)]
        assert np.array_equal(batch["group_focus"][i].numpy(), crop_and_pad_nd(cached, box, 0).astype(bool))
        key = batch["group_keys"][i // n]
        data = trainer.dataset_class(trainer.preprocessed_dataset_folder, [key]).load_case(key)[0]
        image = crop_and_pad_nd(np.asarray(data), box, 0)
        assert np.allclose(batch["group_data"][i].numpy(), image)                # unmirrored: lines up with the cache

    focus_before = {k: v.clone() for k, v in net.focus.state_dict().items()}
    policy_before = {k: v.clone() for k, v in trainer.policy_glance.state_dict().items()}
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in trainer.policy_glance.parameters()}
    monkeypatch.setattr(net.focus, "forward", lambda *a, **k: pytest.fail("the Focus ran in a retrofit step"))
    trainer.on_train_epoch_start()
    out = trainer.train_step(batch)
    assert np.isfinite(out["loss"]) and 0 <= out["mean_reward"] <= 1
    assert all(torch.equal(focus_before[k], v) for k, v in net.focus.state_dict().items())
    assert any(not torch.equal(policy_before[k], v) for k, v in trainer.policy_glance.state_dict().items())


def _check(retro, **kwargs):
    from nnunetv2_gfscreen.trainers.retrofit_cli import check_source_model
    args = dict(results_dataset_folder=str(retro["results"]), preprocessed_dataset_folder=str(retro["dataset_folder"]),
                trainer="nnUNetTrainer", plans=PLANS, configuration=CONFIG, fold="0")
    return check_source_model(**{**args, **kwargs})


def _edit(path: Path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_retrofit_refuses_models_it_cannot_use(retro, tmp_path):
    from nnunetv2_gfscreen.trainers.retrofit_cli import RetrofitError
    assert _check(retro) == retro["checkpoint"]
    with pytest.raises(RetrofitError, match="missing checkpoint"):
        _check(retro, fold="1")
    with pytest.raises(RetrofitError, match="no trained model folder"):
        _check(retro, trainer="nnUNetTrainer_Other")
    model = retro["model"]
    plans_json, dataset_json = (model / "plans.json").read_text(), (model / "dataset.json").read_text()
    try:
        _edit(model / "plans.json", lambda p: p["configurations"][CONFIG].update(patch_size=[32, 48, 48]))
        with pytest.raises(RetrofitError, match="plans mismatch.*patch_size"):
            _check(retro)
        (model / "plans.json").write_text(plans_json)
        _edit(model / "plans.json", lambda p: p["configurations"][CONFIG].update(previous_stage="3d_lowres"))
        with pytest.raises(RetrofitError, match="cascade"):
            _check(retro)
        (model / "plans.json").write_text(plans_json)
        _edit(model / "dataset.json", lambda d: d.update(labels={"background": 0, "lesion": [1, 2], "core": 2},
                                                         regions_class_order=[1, 2]))
        with pytest.raises(RetrofitError, match="regions"):
            _check(retro)
    finally:
        (model / "plans.json").write_text(plans_json)
        (model / "dataset.json").write_text(dataset_json)
    gated = retro["model"].parent / f"GFScreenTrainer__{PLANS}__{CONFIG}"
    (gated / "fold_0").mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        (gated / name).write_text((model / name).read_text())
    torch.save({"network_weights": {"focus.w": torch.zeros(1), "glance.w": torch.zeros(1)}},
               gated / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(RetrofitError, match="already a GF-Screen model"):
        _check(retro, trainer="GFScreenTrainer")


def test_retrofit_command_exits_with_the_reason(retro):
    exe = Path(sys.executable).parent / "nnUNetv2_gfscreen_retrofit"
    env = {**retro["env"], "nnUNet_results": str(retro["results"].parent)}
    proc = subprocess.run([str(exe), "-d", str(retro["dataset_folder"].name), "-c", CONFIG, "-f", "all",
                           "-p", PLANS, "-device", "cpu"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "missing checkpoint" in proc.stderr and "fold_all" in proc.stderr


def test_retrofit_trainer_is_found_like_nnunet_finds_trainers(tmp_path, monkeypatch):
    """-gtr may name a variant in a folder of nnUNet_extTrainer, as -tr may for nnUNetv2_train."""
    from nnunetv2_gfscreen.trainers.retrofit_cli import find_retrofit_trainer

    folder = tmp_path / "my_trainers"
    folder.mkdir()
    (folder / "my_retrofit_variants.py").write_text(
        "from nnunetv2_gfscreen.trainers.retrofit import GFScreenTrainer_Retrofit\n\n\n"
        "class GFScreenTrainer_RetrofitMine(GFScreenTrainer_Retrofit):\n    retrofit_epochs = 3\n")
    monkeypatch.setenv("nnUNet_extTrainer", str(folder) + os.pathsep + os.environ.get("nnUNet_extTrainer", ""))
    assert find_retrofit_trainer("GFScreenTrainer_RetrofitMine").retrofit_epochs == 3
    assert find_retrofit_trainer("GFScreenTrainer_Retrofit").__name__ == "GFScreenTrainer_Retrofit"
    with pytest.raises(SystemExit, match="not a GFScreenTrainer_Retrofit variant"):
        find_retrofit_trainer("nnUNetTrainer")
