"""End to end through the stock nnU-Net CLI: train the short GF-Screen variant on the CPU (crashing twice), resume.

`nnUNet_extTrainer` holds only the lab's trainer folder (GFScreenTrainer_Tiny lives in gfscreen_lab): the
install's .pth must provide the product's.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.e2e_training import TRAINER, load as _load
from tests.nnunet_fixtures import CONFIG


def test_training_writes_glance_into_nnunet_checkpoint(trained_fold):
    ckpt = _load(trained_fold["fold"] / "checkpoint_final.pth")
    weights = ckpt["network_weights"]
    assert ckpt["trainer_name"] == TRAINER
    assert any(k.startswith("glance.") for k in weights) and any(k.startswith("focus.") for k in weights)
    assert "gate.threshold" in weights
    extra = ckpt["gfscreen"]
    assert extra["settings"]["group_size"] == 4
    assert extra["glance_optimizer_state"]["state"], "the Glance optimiser never stepped"
    assert set(extra["reference_glance"]) == {k[len("glance."):] for k in weights if k.startswith("glance.")}
    # the Glance was trained: its weights moved away from the reference refreshed at the last epoch start
    # or at least from a fresh initialisation, and every logged curve has one value per epoch
    log = ckpt["logging"]
    for key in ("grl_losses", "grl_clip", "grl_kl", "grl_ce", "mean_reward", "selection_ratio",
                "glance_sensitivity", "glance_specificity", "seg_losses"):
        assert len(log[key]) == 2, key
    assert all(np.isfinite(log["grl_losses"])) and all(0 <= r <= 1 for r in log["mean_reward"])
    assert (trained_fold["fold"] / "progress.png").is_file()
    assert (trained_fold["fold"] / "validation" / "summary.json").is_file()


def test_found_with_only_the_lab_folder_set(trained_fold):
    """The commands' environment names only the lab's trainer folder; the product's comes from the install."""
    from gfscreen_lab.ext_trainer_env import LAB_SHIM_FOLDER
    assert trained_fold["env"]["nnUNet_extTrainer"] == LAB_SHIM_FOLDER
    assert f"Using trainer 'GFScreenTrainer_Tiny' from: {LAB_SHIM_FOLDER}" in trained_fold["stdout"]


def test_sigkill_mid_epoch_and_mid_checkpoint_write_then_continue_restores_everything(trained_fold):
    # the kill during checkpoint_final.pth's write left only a partial temporary file: --c must not pick a
    # truncated final checkpoint, and resumes from the intact checkpoint_latest.pth (epoch 0 done)
    assert trained_fold["after_second"] == {"final": False, "partial": ["checkpoint_final.pth.partial"],
                                            "latest_epoch": 1}
    restored = trained_fold["restored"]
    assert restored == {"focus_and_glance": True, "policy_glance": True, "reference_glance": True,
                        "focus_optimizer": True, "glance_optimizer": True, "epoch": 1}
    fold = trained_fold["fold"]
    assert not list(fold.glob("*.partial*")) and not (fold / "checkpoint_latest.pth").exists()
    assert _load(fold / "checkpoint_final.pth")["current_epoch"] == 2


def test_continue_training_restores_glance_state(trained_fold):
    interrupted, final = trained_fold["interrupted"], _load(trained_fold["fold"] / "checkpoint_final.pth")
    assert interrupted["current_epoch"] == 1 and final["current_epoch"] == 2
    assert len(final["logging"]["grl_losses"]) == 2
    # the Glance optimiser continued from the saved state: 2 epochs x 2 iterations of AdamW steps in
    # total (a fresh optimiser after --c would show 2)
    steps = lambda ck: {float(s["step"]) for s in ck["gfscreen"]["glance_optimizer_state"]["state"].values()}
    assert steps(interrupted) == {2.0}
    assert steps(final) == {4.0}


def test_training_calibrates_the_gate_before_final_validation(trained_fold):
    import json
    fold = trained_fold["fold"]
    from nnunetv2_gfscreen.core.gate import Gate, GateRule
    stored = json.loads((fold / "gfscreen_calibration.json").read_text())["checkpoints"]["checkpoint_final.pth"]
    final = _load(fold / "checkpoint_final.pth")
    assert final["gfscreen_calibration"] == stored  # the JSON is a copy of the checkpoint's record
    validated = {p.name[:-len(".nii.gz")] for p in (fold / "validation").glob("*.nii.gz")}
    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "GF-Screen calibration of checkpoint_final.pth" in log
    if not stored["calibrated"]:  # the tiny fold's validation cases may hold no lesion
        assert "no lesion" in stored["reason"] and "UNCALIBRATED" in log
        return
    assert Gate.rule_from_state_dict(final["network_weights"]) == GateRule.from_dict(stored["rule"])
    assert stored["point"]["lesion_sensitivity"] >= stored["certified"]["lesion_sensitivity"] - 1e-12
    # the final validation gated each validation case by the rule fitted on the other validation cases
    assert set(stored["loco"]["rules"]) == validated
    assert "gates each case by the rule fitted on the other validation cases" in log


def test_flare_predict_sh_writes_only_binary_masks(trained_fold, tmp_path):
    import SimpleITK as sitk
    repo = Path(__file__).resolve().parents[1]
    images = sorted((trained_fold["raw_folder"] / "imagesTs").glob("*_0000.nii.gz"))
    inputs, outputs = tmp_path / "inputs", tmp_path / "outputs"
    inputs.mkdir()
    for f in images:
        shutil.copy(f, inputs / f.name)
    env = {**trained_fold["env"], "GFSCREEN_TRAINER": TRAINER, "GFSCREEN_CONFIGURATION": CONFIG,
           "GFSCREEN_DEVICE": "cpu", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(["sh", str(repo / "flare" / "predict.sh"), str(inputs), str(outputs)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    expected = {f.name.replace("_0000.nii.gz", ".nii.gz") for f in images}
    assert {p.name for p in outputs.iterdir()} == expected
    for f in images:
        mask = sitk.ReadImage(str(outputs / f.name.replace("_0000.nii.gz", ".nii.gz")))
        image = sitk.ReadImage(str(f))
        assert mask.GetSize() == image.GetSize() and np.allclose(mask.GetSpacing(), image.GetSpacing())
        assert set(np.unique(sitk.GetArrayFromImage(mask))) <= {0, 1}

    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(["sh", str(repo / "flare" / "predict.sh"), str(empty), str(tmp_path / "out2")], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "no <case>_0000.nii.gz" in proc.stderr
    assert not (tmp_path / "out2").exists()
