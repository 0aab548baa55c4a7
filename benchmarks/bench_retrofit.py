"""Benchmark: cost of a retrofit (Glance only, frozen Focus, cached rewards) against the Focus's own training.

Not a test: prints the figures and writes JSON. On a tiny synthetic dataset planned by nnU-Net's CLI
(tests/nnunet_fixtures.py: 6 training cases of 32x96x96, CPU plans with a 16x48x48 patch and an 8-32
feature network, GF-Screen default settings), trainers are built in-process on the device and timed per
training iteration, data loading (in-process, nnU-Net_n_proc_DA=0) and step separately:
  - nnUNetTrainer: the Focus's original training step (nnU-Net's batch and augmentation);
  - GFScreenTrainer: the joint step (for reference);
  - GFScreenTrainer_Retrofit: the Glance-only step reading rewards from the cache, plus the one-time cache.
Then: retrofit total = cache + retrofit epochs x 250 iterations, Focus training = 1000 x 250 iterations.
Validation is left out of both (nnU-Net runs 50 validation iterations per epoch in each).

  python benchmarks/bench_retrofit.py --iterations 10 --out retrofit.json
  python benchmarks/bench_retrofit.py --planned_network     # nnU-Net's planned network and patch for the data
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the test fixtures and the lab build the dataset


def _time_iterations(trainer, iterations: int, warmup: int) -> dict:
    dl, _ = trainer.get_dataloaders()
    trainer.on_train_epoch_start()
    load, step = [], []
    for i in range(warmup + iterations):
        t0 = time.perf_counter()
        batch = next(dl)
        t1 = time.perf_counter()
        trainer.train_step(batch)
        t2 = time.perf_counter()
        if i >= warmup:
            load.append(t1 - t0)
            step.append(t2 - t1)
    return {"load_s": float(np.median(load)), "step_s": float(np.median(step)),
            "iteration_s": float(np.median(np.add(load, step)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--planned_network", action="store_true",
                        help="keep nnU-Net's planned 3d_fullres network and patch (32-320 features) instead of the CPU plans")
    parser.add_argument("--root", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--out", default=None, help="JSON output file")
    args = parser.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="bench_retrofit_"))
    root.mkdir(parents=True, exist_ok=True)
    from tests.nnunet_fixtures import make_planned_dataset, nnunet_env, PATCH
    for k, v in nnunet_env(root).items():
        os.environ[k] = v
    from nnunetv2.run.run_training import maybe_load_checkpoint
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from gfscreen_lab.experiments.cpu_plans import CPU_ARCH_KWARGS, shrink_configuration_for_cpu
    from gfscreen_lab.experiments.results_files import machine_description
    from nnunetv2_gfscreen.trainers import GFScreenTrainer, GFScreenTrainer_Retrofit

    data = make_planned_dataset(root)
    os.environ["nnUNet_n_proc_DA"] = "0"   # after planning: nnU-Net's planner cannot take 0
    plans = json.loads(data["plans_file"].read_text())
    if not args.planned_network:
        plans = shrink_configuration_for_cpu(plans, "3d_fullres", PATCH, CPU_ARCH_KWARGS, batch_size=2)
    plans["configurations"] = {"3d_fullres": plans["configurations"]["3d_fullres"]}   # default GF-Screen settings
    dataset_json = json.loads((data["dataset_folder"] / "dataset.json").read_text())
    device = torch.device(args.device)
    make = lambda cls: cls({**plans, "continue_training": False}, "3d_fullres", 0, dataset_json, device)
    load_before = os.getloadavg()

    focus = make(nnUNetTrainer)
    focus.initialize()
    result = {"nnUNetTrainer": _time_iterations(focus, args.iterations, args.warmup)}
    checkpoint = root / "focus_checkpoint.pth"
    torch.save({"network_weights": focus.network.state_dict(),
                "inference_allowed_mirroring_axes": (0, 1, 2)}, checkpoint)
    joint = make(GFScreenTrainer)
    joint.initialize()
    result["GFScreenTrainer"] = _time_iterations(joint, args.iterations, args.warmup)

    retro = make(GFScreenTrainer_Retrofit)
    maybe_load_checkpoint(retro, False, False, str(checkpoint))
    t0 = time.perf_counter()
    retro.focus_files = retro.prepare_focus_cache()
    cache_s = time.perf_counter() - t0
    result["GFScreenTrainer_Retrofit"] = {**_time_iterations(retro, args.iterations, args.warmup),
                                          "cache_s": cache_s, "cache_cases": len(retro.focus_files)}
    iterations, focus_epochs, retro_epochs = 250, 1000, GFScreenTrainer_Retrofit.retrofit_epochs
    focus_epoch = iterations * result["nnUNetTrainer"]["iteration_s"]
    retro_epoch = iterations * result["GFScreenTrainer_Retrofit"]["iteration_s"]
    summary = {"focus_epoch_s": focus_epoch, "joint_epoch_s": iterations * result["GFScreenTrainer"]["iteration_s"],
               "retrofit_epoch_s": retro_epoch, "retrofit_epoch_over_focus_epoch": retro_epoch / focus_epoch,
               "focus_training_s": focus_epochs * focus_epoch,
               "retrofit_total_s": cache_s + retro_epochs * retro_epoch, "retrofit_epochs": retro_epochs}
    summary["retrofit_share_of_focus_training"] = summary["retrofit_total_s"] / summary["focus_training_s"]
    out = {"machine": machine_description(), "device": str(device), "load_average_before": load_before,
           "load_average_after": os.getloadavg(), "iterations_timed": args.iterations, "per_iteration": result,
           "summary": summary, "planned_network": args.planned_network,
           "patch_size": plans["configurations"]["3d_fullres"]["patch_size"],
           "features_per_stage": plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"], "settings": retro.gfscreen.to_dict()}
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
