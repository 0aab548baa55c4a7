"""What nnU-Net's own commands do with a trained GF-Screen fold (trained_fold: conftest.py, e2e_training.py).

- the final validation (`nnUNetv2_train`, `--val`, `--val_best`) predicts with GFScreenPredictor's gated
  sliding window, each case at its leave-one-case-out threshold, and `--val_best` calibrates the best
  checkpoint, not the final one;
- `nnUNetv2_export_model_to_zip` / `nnUNetv2_install_pretrained_model_from_zip` carry the calibration;
- a folder prediction killed half-way finishes with `--continue_prediction`, no partial file left.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_gfscreen.core.calibration import refit_rule
from nnunetv2_gfscreen.core.calibration_store import CHECKPOINT_KEY
from nnunetv2_gfscreen.core.gate import Gate, GateRule
from nnunetv2_gfscreen.trainers.final_validation import case_rules
from tests.e2e_training import TRAINER, killed, load
from tests.nnunet_fixtures import CONFIG, DATASET_ID, run_cli


def _read(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_final_validation_is_the_gfscreen_predictor_at_leave_one_case_out_rules(trained_fold, tmp_path,
                                                                                  monkeypatch):
    """Each validation case was gated by the rule fitted on the other cases, and predicted as
    GFScreenPredictor predicts it. The final validation ran in another process (its own thread count), so the
    Glance scores and the Focus logits may differ there in the last bits: the test compares decisions away from
    the threshold and masks up to a few near-tie voxels, not bits."""
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2_gfscreen.core.gate import GateRule
    from nnunetv2_gfscreen.predictors.gfscreen_predictor import GFScreenPredictor
    from nnunetv2_gfscreen.trainers.GFScreenTrainer import GFScreenTrainer
    from nnunetv2_gfscreen.trainers.final_validation import case_rules
    from tests.toy_models import patch_nnunet_paths

    patch_nnunet_paths(monkeypatch, trained_fold["root"])
    fold = trained_fold["fold"]
    ckpt = load(fold / "checkpoint_final.pth")
    record = ckpt[CHECKPOINT_KEY]
    rule_of = case_rules(record)
    gate = json.loads((fold / "validation" / "gfscreen_gate.json").read_text())
    assert gate["checkpoint"] == "checkpoint_final.pth" and gate["calibrated"] == record["calibrated"]
    cases = [c["case"] for c in gate["cases"]]
    assert {c["case"]: c["threshold"] for c in gate["cases"]} == pytest.approx({c: rule_of(c).threshold
                                                                                 for c in cases})
    assert gate["pooled"]["cases"] == len(cases) and 0 <= gate["pooled"]["selection_ratio"] <= 1
    assert (fold / "validation" / "summary.json").is_file()  # nnU-Net's own summary is still written

    plans = json.loads((fold.parent / "plans.json").read_text())
    dataset_json = json.loads((fold.parent / "dataset.json").read_text())
    pm = PlansManager(plans)
    cm = pm.get_configuration(CONFIG)
    net = GFScreenTrainer.build_network_architecture(pm, cm, 1, 2, enable_deep_supervision=False)
    net.load_state_dict(ckpt["network_weights"])
    data_folder = trained_fold["dataset_folder"] / cm.data_identifier
    dataset = infer_dataset_class(str(data_folder))(str(data_folder), cases)
    for case in cases:
        rule = rule_of(case)
        predictor = GFScreenPredictor(device=torch.device("cpu"), allow_tqdm=False, rule=rule, torch_io="off")
        predictor.manual_initialization(net, pm, cm, None, dataset_json, TRAINER,
                                        ckpt["inference_allowed_mirroring_axes"])
        data, _, _, properties = dataset.load_case(case)
        logits = predictor.predict_sliding_window_return_logits(torch.from_numpy(np.asarray(data[:])))
        record_here = predictor.records[-1]
        assert GateRule.from_dict(record_here.rule) == rule
        stored = next(c for c in gate["cases"] if c["case"] == case)
        clear = [abs(s - rule.threshold) > 1e-3 for s in record_here.scores]
        if all(clear):
            assert stored["tiles_selected"] == record_here.tiles_selected
        export_prediction_from_logits(logits, properties, cm, pm, dataset_json, str(tmp_path / case))
        ours = _read(tmp_path / f"{case}.nii.gz")
        theirs = _read(fold / "validation" / f"{case}.nii.gz")
        assert ours.shape == theirs.shape and (ours != theirs).mean() < 1e-3, case


def _copy_results(trained_fold, root: Path) -> Path:
    """A copy of the trained model's results folder under root/results (so a test may rewrite it)."""
    src = trained_fold["fold"].parent
    dst = root / "results" / src.parent.name / src.name
    shutil.copytree(src, dst)
    return dst / "fold_0"


def test_val_best_calibrates_and_validates_the_best_checkpoint(trained_fold, tmp_path):
    fold = _copy_results(trained_fold, tmp_path)
    final_before = load(fold / "checkpoint_final.pth")[CHECKPOINT_KEY]
    env = {**trained_fold["env"], "nnUNet_results": str(tmp_path / "results"), "nnUNet_def_n_proc": "1"}
    # forget the best checkpoint's calibration from the training's end: --val_best must fit it again
    best = load(fold / "checkpoint_best.pth")
    del best[CHECKPOINT_KEY]
    torch.save(best, fold / "checkpoint_best.pth")
    stored = json.loads((fold / "gfscreen_calibration.json").read_text())
    del stored["checkpoints"]["checkpoint_best.pth"]
    (fold / "gfscreen_calibration.json").write_text(json.dumps(stored))
    run_cli(["nnUNetv2_train", str(DATASET_ID), CONFIG, "0", "-tr", TRAINER, "-device", "cpu", "--val", "--val_best"],
            env)
    best = load(fold / "checkpoint_best.pth")
    calibration = best[CHECKPOINT_KEY]
    assert Gate.rule_from_state_dict(best["network_weights"]) == GateRule.from_dict(calibration["rule"])
    assert load(fold / "checkpoint_final.pth")[CHECKPOINT_KEY] == final_before  # untouched by --val_best
    stored = json.loads((fold / "gfscreen_calibration.json").read_text())["checkpoints"]
    assert stored["checkpoint_best.pth"] == calibration and stored["checkpoint_final.pth"] == final_before
    gate = json.loads((fold / "validation" / "gfscreen_gate.json").read_text())
    assert gate["checkpoint"] == "checkpoint_best.pth"
    assert {c["case"]: c["threshold"] for c in gate["cases"]} == \
        pytest.approx({c["case"]: case_rules(calibration)(c["case"]).threshold for c in gate["cases"]})
    assert "GF-Screen calibration of checkpoint_best.pth" in "".join(p.read_text() for p in fold.glob("training_log*"))


def test_export_and_install_round_trip_keeps_the_calibration(trained_fold, tmp_path):
    fold = trained_fold["fold"]
    original = load(fold / "checkpoint_final.pth")
    archive = tmp_path / "model.zip"
    run_cli(["nnUNetv2_export_model_to_zip", "-d", str(DATASET_ID), "-o", str(archive), "-c", CONFIG, "-tr", TRAINER,
             "-f", "0"], trained_fold["env"])
    env = {**trained_fold["env"], "nnUNet_results": str(tmp_path / "installed")}
    run_cli(["nnUNetv2_install_pretrained_model_from_zip", str(archive)], env)
    installed_fold = tmp_path / "installed" / fold.relative_to(fold.parents[2])
    installed = load(installed_fold / "checkpoint_final.pth")
    assert not (installed_fold / "gfscreen_calibration.json").exists()  # the checkpoint alone carries it
    assert installed[CHECKPOINT_KEY] == original[CHECKPOINT_KEY]
    assert Gate.rule_from_state_dict(installed["network_weights"]) == \
        Gate.rule_from_state_dict(original["network_weights"])

    # predicting from the installed copy refits its rule from the stored calibration
    inputs = tmp_path / "in"
    inputs.mkdir()
    image = sorted((trained_fold["raw_folder"] / "imagesTs").glob("*_0000.nii.gz"))[0]
    shutil.copy(image, inputs / image.name)
    out = tmp_path / "out"
    run_cli(["nnUNetv2_predict_gfscreen", "-i", str(inputs), "-o", str(out), "-d", str(DATASET_ID), "-c", CONFIG,
             "-tr", TRAINER, "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "0", "-nps", "0",
             "--target_sensitivity", "0.5"], env)
    report = json.loads(next((out / "gfscreen_reports").glob("*.json")).read_text())
    record = original[CHECKPOINT_KEY]
    if record["calibrated"]:
        assert report["threshold"] == pytest.approx(refit_rule(record, target=0.5)[0].threshold, abs=1e-9)


def test_prediction_killed_half_way_continues_without_partial_files(trained_fold, tmp_path):
    images = sorted((trained_fold["raw_folder"] / "imagesTs").glob("*_0000.nii.gz"))
    assert len(images) >= 2
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for f in images:
        shutil.copy(f, inputs / f.name)
    cases = [f.name[:-len("_0000.nii.gz")] for f in images]
    predict = ["nnUNetv2_predict_gfscreen", "-i", str(inputs), "-o", str(out), "-d", str(DATASET_ID), "-c", CONFIG,
               "-tr", TRAINER, "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "0", "-nps", "0"]
    killed(predict, trained_fold["env"], "write_image:2")  # the second case's mask, half written
    assert (out / f"{cases[0]}.nii.gz").is_file() and not (out / f"{cases[1]}.nii.gz").exists()
    assert [p for p in out.iterdir() if ".partial" in p.name], "the kill should have hit a write in progress"
    first_written = (out / f"{cases[0]}.nii.gz").stat().st_mtime_ns

    run_cli(predict + ["--continue_prediction"], trained_fold["env"])
    assert (out / f"{cases[0]}.nii.gz").stat().st_mtime_ns == first_written  # not predicted again
    for case, image in zip(cases, images):
        mask = _read(out / f"{case}.nii.gz")
        assert mask.shape == _read(image).shape and set(np.unique(mask)) <= {0, 1}
        assert json.loads((out / "gfscreen_reports" / f"{case}.json").read_text())["case"] == case
    leftovers = [p.name for p in out.rglob("*") if ".partial" in p.name]
    assert not leftovers, leftovers
