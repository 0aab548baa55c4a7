"""A tiny synthetic nnU-Net dataset, planned and preprocessed by nnU-Net's own CLI, for the CPU tests.

The planned 3d_fullres patch covers the whole small volume (docs/nnunet_internals.md, section 8: tiles only exist when the
volume is larger than the patch), so the GF-Screen configuration gets a smaller patch and a narrow
network, as a user would edit plans for a quick CPU run.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

from gfscreen_lab.experiments.cpu_plans import CPU_ARCH_KWARGS, shrink_configuration_for_cpu
from gfscreen_lab.ext_trainer_env import lab_environment

DATASET_ID = 990
SHAPE = (32, 96, 96)
PATCH = [16, 48, 48]
CONFIG = "3d_fullres_gfscreen"


def nnunet_env(root: Path) -> dict:
    """nnU-Net's folders under `root`; `nnUNet_extTrainer` holds only the lab's trainer folder (the tests train
    GFScreenTrainer_Tiny): the product's folder must come from the install's .pth."""
    env = lab_environment({k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"})
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
               nnUNet_results=str(root / "results"), nnUNet_compile="f", OMP_NUM_THREADS="2",
               OMP_WAIT_POLICY="PASSIVE")  # busy-waiting OpenMP threads are ~6x slower on 2 shared cores
    return env


def training_env(env: dict) -> dict:
    """Augmentation in-process (no worker pool): nnU-Net's planner cannot take nnUNet_n_proc_DA=0, training can.
    One export worker in the final validation (nnUNet_def_n_proc; nnU-Net's default of 8 spawned processes took
    2.5 min of the e2e fixture's 5 on 2 shared cores, against under 1 min with one)."""
    return {**env, "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1"}


def run_cli(args, env, timeout=900) -> subprocess.CompletedProcess:
    """Run an installed console script (or, with args[0] == "python", this interpreter: the lab's `-m` commands)
    the way a user would; fail with its output if it fails."""
    exe = sys.executable if args[0] == "python" else Path(sys.executable).parent / args[0]
    proc = subprocess.run([str(exe), *args[1:]], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def make_planned_dataset(root: Path) -> dict:
    env = nnunet_env(root)
    run_cli(["python", "-m", "gfscreen_lab.synthetic.dataset", "-d", str(DATASET_ID), "-ntr", "6", "-nts", "2",
             "--shape", *map(str, SHAPE), "--seed", "0", "--healthy_fraction", "0.2", "-np", "2"], env)
    run_cli(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "2", "-npfp", "2"], env)
    run_cli(["nnUNetv2_gfscreen_plan", "-d", str(DATASET_ID), "--set", "group_size=4"], env)
    pre = root / "preprocessed"
    plans_file = next(pre.glob(f"Dataset{DATASET_ID}_*")) / "nnUNetPlans.json"
    plans = shrink_configuration_for_cpu(json.loads(plans_file.read_text()), CONFIG, PATCH, CPU_ARCH_KWARGS,
                                         batch_size=2)
    plans_file.write_text(json.dumps(plans, indent=2))
    return {"root": root, "env": env, "plans_file": plans_file, "dataset_folder": plans_file.parent,
            "raw_folder": next((root / "raw").glob(f"Dataset{DATASET_ID}_*"))}
