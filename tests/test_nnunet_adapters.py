"""Each reliance of nnunet_adapters.py on nnU-Net's internals, checked against the installed nnU-Net: an upgrade
that changes one fails here, by name, instead of misbehaving somewhere else."""
import inspect
import re
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import pytest

import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_gfscreen.nnunet_adapters import NNUNET_VERSIONS, PredictorHooks, final_validation_with

REPO = Path(__file__).resolve().parents[1]


def _src(f) -> str:
    return inspect.getsource(f)


def test_installed_nnunet_is_in_the_range_the_adaptations_were_written_for():
    from packaging.specifiers import SpecifierSet
    assert version("nnunetv2") in SpecifierSet(NNUNET_VERSIONS)
    assert f"nnunetv2{NNUNET_VERSIONS}" in (REPO / "setup.cfg").read_text().replace(" ", "")


def test_final_validation_builds_nnunet_predictor_by_module_name_and_loads_each_case_first():
    src = _src(nnUNetTrainer.perform_actual_validation)
    assert "predictor = nnUNetPredictor(" in src and hasattr(nnunet_trainer_module, "nnUNetPredictor")
    load, predict = src.index(".load_case(k)"), src.index("predictor.predict_sliding_window_return_logits(")
    assert "self.dataset_class(" in src and load < predict


def test_final_validation_with_swaps_and_restores_even_on_error():
    class Dataset:
        def __init__(self, *a, **k):
            pass

        def load_case(self, k):
            return k

    trainer = SimpleNamespace(dataset_class=Dataset)
    original = nnunet_trainer_module.nnUNetPredictor
    with pytest.raises(RuntimeError):
        with final_validation_with(trainer, PredictorHooks) as cursor:
            assert nnunet_trainer_module.nnUNetPredictor is PredictorHooks
            assert trainer.dataset_class("folder", ["a"]).load_case("a") == "a" and cursor.current == "a"
            raise RuntimeError
    assert nnunet_trainer_module.nnUNetPredictor is original and trainer.dataset_class is Dataset


def test_sliding_window_hook_mirror_step_and_case_lists_exist_as_relied_on():
    assert "self._internal_predict_sliding_window_return_logits(" in \
        _src(nnUNetPredictor.predict_sliding_window_return_logits)
    params = list(inspect.signature(nnUNetPredictor._internal_predict_sliding_window_return_logits).parameters)
    assert params[:4] == ["self", "data", "slicers", "do_on_device"]
    # the network's TTA-copy reuse (core/network.py) relies on the unflipped tile coming first, then its flips
    mirror = _src(nnUNetPredictor._internal_maybe_mirror_and_predict)
    assert re.search(r"prediction = self\.network\(x\)", mirror) and \
        mirror.index("self.network(x)") < mirror.index("torch.flip(x, axes)")
    params = list(inspect.signature(nnUNetPredictor._manage_input_and_output_lists).parameters)
    assert params[:8] == ["self", "list_of_lists_or_source_folder", "output_folder_or_list_of_truncated_output_files",
                          "folder_with_segs_from_prev_stage", "overwrite", "part_id", "num_parts", "save_probabilities"]


def test_no_module_outside_the_adapters_touches_nnunet_internals():
    """The layout rule: nnU-Net's private members of its predictor and trainer are only named in
    nnunet_adapters.py, and only there are nnU-Net's module attributes replaced."""
    import ast
    private = {n for cls in (nnUNetTrainer, nnUNetPredictor) for n in vars(cls) if n.startswith("_")
               and not n.startswith("__")}
    package = REPO / "nnunetv2_gfscreen"
    offenders = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "nnunet_adapters.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in private:
                offenders.append(f"{path.relative_to(REPO)}: {node.attr}")
            if isinstance(node, ast.FunctionDef) and node.name in private:
                offenders.append(f"{path.relative_to(REPO)}: def {node.name}")
            if isinstance(node, ast.Assign):
                for target in node.targets:  # nnunetv2.some.module.name = ... (a replacement)
                    root = target
                    while isinstance(root, ast.Attribute):
                        root = root.value
                    if isinstance(target, ast.Attribute) and isinstance(root, ast.Name) and \
                            root.id.startswith("nnunet") and root.id != "nnunet_adapters":
                        offenders.append(f"{path.relative_to(REPO)}: assigns {ast.unparse(target)}")
    assert not offenders, offenders


def test_trainer_lookup_searches_nnunet_folder_then_ext_folders_through_the_module_name():
    import nnunetv2.utilities.find_objects as find_objects
    from nnunetv2_gfscreen.nnunet_adapters import NNUNET_TRAINER_FOLDER
    src = _src(find_objects.recursive_find_trainer_class_by_name)
    first, ext = src.index("recursive_find_python_class("), src.index("nnUNet_extTrainer.get()")
    assert first < ext and "if nnunet_trainer is None:" in src[first:ext] and hasattr(find_objects,
                                                                                     "recursive_find_python_class")
    assert src.count("recursive_find_python_class(") == 2 and Path(NNUNET_TRAINER_FOLDER).is_dir()
    assert "recursive_find_trainer_class_by_name(trainer_name)" in _src(nnUNetPredictor.initialize_from_trained_model_folder)


def test_trainer_lookup_past_nnunet_folder_finds_the_class_nnunet_finds():
    import nnunetv2.utilities.find_objects as find_objects
    from nnunetv2_gfscreen.nnunet_adapters import nnunet_trainer_folder_may_hold, trainer_lookup_past_nnunet_folder
    assert nnunet_trainer_folder_may_hold("nnUNetTrainer_5epochs") and nnunet_trainer_folder_may_hold("nnUNetTrainer")
    assert not nnunet_trainer_folder_may_hold("GFScreenTrainer") and not nnunet_trainer_folder_may_hold("nnUNetTrain")
    original = find_objects.recursive_find_python_class
    for name in ("GFScreenTrainer", "GFScreenTrainer_DemoLong", "nnUNetTrainer_5epochs"):  # product, lab, nnU-Net's
        with trainer_lookup_past_nnunet_folder():
            found = find_objects.recursive_find_trainer_class_by_name(name)
        assert found is find_objects.recursive_find_trainer_class_by_name(name) and found.__name__ == name
    with pytest.raises(RuntimeError, match="Could not find"), trainer_lookup_past_nnunet_folder():
        find_objects.recursive_find_trainer_class_by_name("GFScreenTrainer_NoSuchVariant")
    assert find_objects.recursive_find_python_class is original


def test_gfscreen_model_loads_without_importing_nnunet_trainer_variants():
    """A fresh interpreter (this one has imported them already): the shipped model of a lab trainer loads, and no
    module of nnU-Net's trainer variants (nor timm, which Primus imports) came with it."""
    import subprocess
    import sys
    code = ("import sys, torch; from nnunetv2_gfscreen.predictors.gfscreen_predictor import GFScreenPredictor; "
            "p = GFScreenPredictor(device=torch.device('cpu'), allow_tqdm=False); "
            f"p.initialize_from_trained_model_folder({str(REPO / 'gfscreen_lab' / 'demo_model' / 'GFScreenTrainer_DemoLong__nnUNetPlans__3d_fullres_gfscreen')!r}, (0,)); "
            "print(p.trainer_name, sorted(m for m in sys.modules if m.startswith(('nnunetv2.training.nnUNetTrainer.variants', "
            "'nnunetv2.training.nnUNetTrainer.primus', 'timm'))))")
    import os
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "GFScreenTrainer_DemoLong []"
