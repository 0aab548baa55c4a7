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
import tempfile
import time
from pathlib import Path

import torch

from in_process import make_trainer, prepare, time_iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--planned_network", action="store_true",
                        help="keep nnU-Net's planned 3d_fullres network and patch (32-320 features) instead of "
                             "the CPU plans")
    parser.add_argument("--root", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--out", default=None, help="JSON output file")
    args = parser.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="bench_retrofit_"))
    plans, dataset_json = prepare(root, args.planned_network)
    from nnunetv2.run.run_training import maybe_load_checkpoint
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from gfscreen_lab.experiments.results_files import machine_description
    from nnunetv2_gfscreen.trainers import GFScreenTrainer, GFScreenTrainer_Retrofit

    device = torch.device(args.device)
    make = lambda cls: make_trainer(cls, plans, dataset_json, device, initialize=False)
    load_before = os.getloadavg()

    focus = make(nnUNetTrainer)
    focus.initialize()
    result = {"nnUNetTrainer": time_iterations(focus, args.iterations, args.warmup)}
    checkpoint = root / "focus_checkpoint.pth"
    torch.save({"network_weights": focus.network.state_dict(),
                "inference_allowed_mirroring_axes": (0, 1, 2)}, checkpoint)
    joint = make(GFScreenTrainer)
    joint.initialize()
    result["GFScreenTrainer"] = time_iterations(joint, args.iterations, args.warmup)

    retro = make(GFScreenTrainer_Retrofit)
    maybe_load_checkpoint(retro, False, False, str(checkpoint))
    t0 = time.perf_counter()
    retro.focus_files = retro.prepare_focus_cache()
    cache_s = time.perf_counter() - t0
    result["GFScreenTrainer_Retrofit"] = {**time_iterations(retro, args.iterations, args.warmup),
                                          "cache_s": cache_s, "cache_cases": len(retro.focus_files)}
    iterations, focus_epochs, retro_epochs = 250, 1000, GFScreenTrainer_Retrofit.retrofit_epochs
    focus_epoch = iterations * result["nnUNetTrainer"]["iteration_median_s"]
    retro_epoch = iterations * result["GFScreenTrainer_Retrofit"]["iteration_median_s"]
    joint_epoch = iterations * result["GFScreenTrainer"]["iteration_median_s"]
    summary = {"focus_epoch_s": focus_epoch, "joint_epoch_s": joint_epoch,
               "retrofit_epoch_s": retro_epoch, "retrofit_epoch_over_focus_epoch": retro_epoch / focus_epoch,
               "focus_training_s": focus_epochs * focus_epoch,
               "retrofit_total_s": cache_s + retro_epochs * retro_epoch, "retrofit_epochs": retro_epochs}
    summary["retrofit_share_of_focus_training"] = summary["retrofit_total_s"] / summary["focus_training_s"]
    config = plans["configurations"]["3d_fullres"]
    out = {"machine": machine_description(), "device": str(device), "load_average_before": load_before,
           "load_average_after": os.getloadavg(), "iterations_timed": args.iterations, "per_iteration": result,
           "summary": summary, "planned_network": args.planned_network,
           "patch_size": plans["configurations"]["3d_fullres"]["patch_size"],
           "features_per_stage": config["architecture"]["arch_kwargs"]["features_per_stage"],
           "settings": retro.gfscreen.to_dict()}
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
