"""The trained fold shared by the end-to-end tests: GFScreenTrainer_Tiny trained through nnUNetv2_train on the
CPU, killed twice on the way (SIGKILL, test-only fault injection: fault_injection/sitecustomize.py) and
resumed with --c. `nnUNet_extTrainer` in the environment of these commands holds only the lab's trainer folder
(tests/nnunet_fixtures.py): the install's .pth must provide the product's.
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.nnunet_fixtures import CONFIG, DATASET_ID, run_cli, training_env

TRAINER = "GFScreenTrainer_Tiny"


def _fold(root):
    results = root / "results"
    return next(results.glob(f"Dataset{DATASET_ID}_*")) / f"{TRAINER}__nnUNetPlans__{CONFIG}" / "fold_0"


FAULTS = Path(__file__).resolve().parent / "fault_injection"  # a sitecustomize.py that kills at GFSCREEN_FAULT


def killed(args, env, fault: str, timeout=900) -> str:
    """Run an installed command with the test-only fault injection; it must die by SIGKILL. Returns its output."""
    exe = Path(sys.executable).parent / args[0]
    fault_env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(FAULTS), env.get("PYTHONPATH")])),
                 "GFSCREEN_FAULT": fault}
    proc = subprocess.run([str(exe), *args[1:]], env=fault_env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == -signal.SIGKILL, f"{args} was not killed ({proc.returncode}):\n{proc.stdout[-3000:]}" \
                                               f"\n{proc.stderr[-3000:]}"
    return proc.stdout


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _restored_by_continue(env, fold) -> dict:
    """What --c restores, checked in this process with nnU-Net's own loading path: the trainer's state after
    `maybe_load_checkpoint(trainer, continue_training=True)` equals the checkpoint file it picked."""
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    with pytest.MonkeyPatch.context() as mp:
        for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            mp.setenv(k, env[k])
        trainer = get_trainer_from_args(str(DATASET_ID), CONFIG, 0, TRAINER, continue_training=True,
                                        device=torch.device("cpu"))
        maybe_load_checkpoint(trainer, True, False)
    ckpt = load(fold / "checkpoint_latest.pth")
    extra = ckpt["gfscreen"]
    sgd, adamw = trainer.optimizer.state_dict(), trainer.glance_optimizer.state_dict()
    return {
        "focus_and_glance": _same_state(trainer.network.state_dict(), ckpt["network_weights"]),
        "policy_glance": _same_state(trainer.policy_glance.state_dict(), extra["policy_glance"]),
        "reference_glance": _same_state(trainer.reference_glance.state_dict(), extra["reference_glance"]),
        "focus_optimizer": sgd["state"].keys() == ckpt["optimizer_state"]["state"].keys() != set() and all(
            torch.equal(sgd["state"][k]["momentum_buffer"], v["momentum_buffer"])
            for k, v in ckpt["optimizer_state"]["state"].items()),
        "glance_optimizer": adamw["state"].keys() == extra["glance_optimizer_state"]["state"].keys() != set() and all(
            torch.equal(adamw["state"][k][s], v[s]) for k, v in extra["glance_optimizer_state"]["state"].items()
            for s in ("step", "exp_avg", "exp_avg_sq")),
        "epoch": trainer.current_epoch,
    }


def train_with_crashes(planned_dataset: dict) -> dict:
    """Train with two crashes (SIGKILL) on the way, as a pre-empted cluster job would see them: mid-epoch 1
    (after epoch 0's checkpoint), then, resumed with --c, half-way through writing checkpoint_final.pth; the
    third start (--c) finishes the training and its final validation."""
    env = training_env(planned_dataset["env"])
    train = ["nnUNetv2_train", str(DATASET_ID), CONFIG, "0", "-tr", TRAINER, "-device", "cpu"]
    first = killed(train, env, "train_steps:3")  # 2 steps per epoch: the 3rd is mid-epoch 1
    fold = _fold(planned_dataset["root"])
    interrupted = load(fold / "checkpoint_latest.pth")
    assert not (fold / "checkpoint_final.pth").exists()
    second = killed(train + ["--c"], env, "save:checkpoint_final")
    after_second = {"final": (fold / "checkpoint_final.pth").exists(),
                    "partial": sorted(p.name for p in fold.glob("*.partial*")),
                    "latest_epoch": load(fold / "checkpoint_latest.pth")["current_epoch"]}
    restored = _restored_by_continue(env, fold)
    proc = run_cli(train + ["--c"], env)
    return {**planned_dataset, "fold": fold, "stdout": first + second + proc.stdout, "env": env,
            "interrupted": interrupted, "after_second": after_second, "restored": restored}


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)
