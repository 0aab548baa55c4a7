"""Benchmark: seconds per training iteration of nnUNetTrainer and GF-Screen trainers, side by side in one run.

Not a test: prints a table and writes JSON. Trainers are built in-process on the tests' synthetic dataset
(in_process.py) and timed on the same cases (same seed), one iteration of each in turn (so that the load of a
shared machine hits them alike), data loading (in-process) and step apart. `--every_tile` adds, per GF-Screen
trainer, an arm that steps as the trainer did before the Focus's group passes were limited to the tiles a reward
can depend on: every group tile predicted, lesion slots drawn among lesion tiles (not per lesion), the dense loss
voxel-balanced. GF-Screen steps are also split into phases: the Focus's forward on nnU-Net's batch, the Focus's
group passes (for the rewards; with the number of tiles predicted), the policy Glance's forward, the reference
Glance's forward, the Glance's EMA, and the rest (both backwards, both optimiser steps, rewards and losses); the
Glance's share of the backward is measured apart on one group (forward + backward minus forward).

  python benchmarks/bench_train_step.py                       # nnU-Net's planned network for the data
  python benchmarks/bench_train_step.py --cpu_plans --every_tile --out step.json   # CPU plans, DemoLong, before
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from in_process import PhaseTimer, make_trainer, prepare, time_interleaved, with_gfscreen_settings

# the CPU experiments' Glance (gfscreen_lab/experiments/runner.py DemoSettings.gfscreen_settings)
DEMO_GLANCE = {"glance_base_features": 8, "glance_lr": 2e-3}
# the sampler and dense loss of the earlier trainer (the `--every_tile` arm)
EARLIER = {"lesion_slots_per_lesion": 0, "glance_dense_per_lesion": 0}


class _CountingNetwork:
    """Stands in for `trainer.local_network()` (the group passes' network) and counts the tiles it predicts."""

    def __init__(self, network, counter: Dict[str, int]):
        self.network, self.counter = network, counter

    def __call__(self, x):
        self.counter["tiles"] += int(x.shape[0])
        return self.network(x)


def _instrument(trainer, phases: PhaseTimer, counter: Dict[str, int]) -> None:
    phases.wrap(trainer, "focus_loss", "focus_forward")
    phases.wrap(trainer, "group_focus_predictions", "focus_group_passes")
    phases.wrap(trainer, "policy_forward", "glance_forward")
    phases.wrap(trainer.reference_glance, "forward", "reference_glance_forward")
    phases.wrap(trainer, "update_glance_average", "glance_ema")
    local = trainer.local_network
    trainer.local_network = lambda: _CountingNetwork(local(), counter)


def _glance_backward_s(trainer, batch: dict, repeats: int = 3) -> float:
    """Seconds of the policy Glance's backward on one group (forward + backward minus forward, medians)."""
    x = batch["group_data"].to(trainer.device)
    fwd, both = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits, dense = trainer.policy_forward(x)
        t1 = time.perf_counter()
        (logits.float().sum() + (dense.float().mean() if dense is not None else 0)).backward()
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        both.append(t2 - t0)
        trainer.glance_optimizer.zero_grad(set_to_none=True)
    return float(np.median(both) - np.median(fwd))


def _every_tile(trainer) -> None:
    """The earlier step: the Focus predicts every group tile."""
    trainer.focus_tiles = lambda batch: torch.arange(batch["group_data"].shape[0])


def _time(trainers: dict, iterations: int, warmup: int) -> dict:
    phases, counters, last = {}, {}, {}
    for name, trainer in trainers.items():
        if hasattr(trainer, "policy_glance"):
            phases[name], counters[name] = PhaseTimer(trainer.device), {"tiles": 0}
            _instrument(trainer, phases[name], counters[name])

    def keep(name, _, batch):
        last[name] = batch
    out = time_interleaved(trainers, iterations, warmup, phases=phases, after_step=keep)
    for name in phases:
        r = out[name]
        r["focus_group_tiles_per_iteration"] = counters[name]["tiles"] / (iterations + warmup)
        r["group_tiles_per_iteration"] = int(last[name]["group_data"].shape[0])
        r["glance_backward_s"] = _glance_backward_s(trainers[name], last[name])
        r["phases_s"]["rest"] = r["step_s"] - sum(r["phases_s"].values())
    return out


def _rows(label: str, results: Dict[str, dict]) -> List[str]:
    base = results["nnUNetTrainer"]["iteration_s"]
    rows = []
    for name, r in results.items():
        passes = r.get("focus_group_tiles_per_iteration")
        rows.append(f"| {label} | {name} | {r['load_s']:.2f} | {r['step_s']:.2f} | {r['iteration_s']:.2f} | "
                    f"{r['iteration_s'] / base:.2f} | "
                    + (f"{passes:.1f} of {r['group_tiles_per_iteration']}" if passes is not None else "-") + " |")
    return rows


def _phase_rows(label: str, results: Dict[str, dict]) -> List[str]:
    rows = []
    for name, r in results.items():
        if "phases_s" not in r:
            continue
        p = r["phases_s"]
        glance_bwd = r["glance_backward_s"]
        rows.append(f"| {label} | {name} | {r['load_s']:.2f} | {p.get('focus_forward', 0):.2f} | "
                    f"{p.get('focus_group_passes', 0):.2f} | {p.get('glance_forward', 0):.2f} | {glance_bwd:.2f} | "
                    f"{p.get('reference_glance_forward', 0):.2f} | {p.get('glance_ema', 0):.3f} | "
                    f"{p['rest'] - glance_bwd:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cpu_plans", action="store_true",
                        help="also time the tests' CPU plans (16x48x48 patch, 8-32 features) with "
                             "GFScreenTrainer_DemoLong (the CPU experiments' trainer and Glance)")
    parser.add_argument("--no_planned", action="store_true", help="skip nnU-Net's planned network")
    parser.add_argument("--every_tile", action="store_true",
                        help="also time each GF-Screen trainer as it stepped before (every group tile predicted)")
    parser.add_argument("--root", default=None, help="work folder (default: a temporary one); reused if it holds "
                                                     "the dataset")
    parser.add_argument("--out", default=None, help="JSON output file")
    args = parser.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="bench_train_step_"))
    device = torch.device(args.device)
    load_before = os.getloadavg()
    runs, table, phase_table = {}, [], []
    variants = ([] if args.no_planned else [("planned", True)]) + ([("cpu", False)] if args.cpu_plans else [])
    for label, planned in variants:
        plans, dataset_json = prepare(root, planned)
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        from gfscreen_lab.trainers import GFScreenTrainer_DemoLong
        from nnunetv2_gfscreen.trainers import GFScreenTrainer
        arms = [("GFScreenTrainer", GFScreenTrainer, {})]
        if not planned:
            arms.append(("GFScreenTrainer_DemoLong", GFScreenTrainer_DemoLong, DEMO_GLANCE))
        trainers = {"nnUNetTrainer": make_trainer(nnUNetTrainer, plans, dataset_json, device)}
        for name, cls, settings in arms:
            trainers[name] = make_trainer(cls, with_gfscreen_settings(plans, settings), dataset_json, device)
            if args.every_tile:
                earlier = make_trainer(cls, with_gfscreen_settings(plans, {**settings, **EARLIER}), dataset_json,
                                       device)
                _every_tile(earlier)
                trainers[f"{name} (every tile)"] = earlier
        results = _time(trainers, args.iterations, args.warmup)
        config = plans["configurations"]["3d_fullres"]
        runs[label] = {"patch_size": config["patch_size"], "batch_size": config["batch_size"],
                       "features_per_stage": config["architecture"]["arch_kwargs"]["features_per_stage"],
                       "per_iteration": results,
                       "ratio_gfscreen_over_nnunet": results["GFScreenTrainer"]["iteration_s"]
                       / results["nnUNetTrainer"]["iteration_s"]}
        table += _rows(label, results)
        phase_table += _phase_rows(label, results)
    from gfscreen_lab.experiments.results_files import machine_description
    out = {"machine": machine_description(), "device": str(device), "load_average_before": load_before,
           "load_average_after": os.getloadavg(), "iterations_timed": args.iterations, "warmup": args.warmup,
           "runs": runs}
    print("| plans | trainer | load s | step s | iteration s | x nnUNetTrainer | Focus group passes (tiles) |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(table))
    print("\nGF-Screen step, seconds per iteration:")
    print("| plans | trainer | data loading | Focus forward | Focus group passes | Glance forward | Glance backward "
          "| reference Glance | Glance EMA | Focus backward + optimisers + rest |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(phase_table))
    print(f"\nmachine: {out['machine']}; load average before {load_before}, after {out['load_average_after']}")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
