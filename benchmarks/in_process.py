"""Trainers built in-process on the tests' synthetic dataset and timed per training iteration (benchmarks share it).

The dataset is tests/nnunet_fixtures.py's (6 training cases of 32x96x96, planned by nnU-Net's CLI). The
benchmarks time nnU-Net's `3d_fullres` configuration either with nnU-Net's planned network and patch
(`planned_network=True`: the patch covers the whole 32x96x96 volume, so a case is one grid tile) or with the
tests' CPU plans (16x48x48 patch, an 8-32 feature network: 27 grid tiles per case). Data loading runs in-process
(nnUNet_n_proc_DA=0) and is timed apart from the step.
"""
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the test fixtures build the dataset


def prepare(root: Path, planned_network: bool) -> tuple:
    """(plans, dataset_json) of the synthetic dataset under `root` (made and planned once; reused if present).

    Only `3d_fullres` is kept, without a gfscreen block: GF-Screen trainers run with the default settings
    unless a benchmark adds its own."""
    from tests.nnunet_fixtures import PATCH, make_planned_dataset, nnunet_env
    from gfscreen_lab.experiments.cpu_plans import CPU_ARCH_KWARGS, shrink_configuration_for_cpu
    root.mkdir(parents=True, exist_ok=True)
    for k, v in nnunet_env(root).items():
        os.environ[k] = v
    existing = sorted((root / "preprocessed").glob("Dataset*/nnUNetPlans.json"))
    if existing:
        plans_file = existing[0]
    else:
        plans_file = make_planned_dataset(root)["plans_file"]
    os.environ["nnUNet_n_proc_DA"] = "0"   # after planning: nnU-Net's planner cannot take 0
    plans = json.loads(plans_file.read_text())
    if not planned_network:
        plans = shrink_configuration_for_cpu(plans, "3d_fullres", PATCH, CPU_ARCH_KWARGS, batch_size=2)
    plans["configurations"] = {"3d_fullres": plans["configurations"]["3d_fullres"]}
    dataset_json = json.loads((plans_file.parent / "dataset.json").read_text())
    return plans, dataset_json


def with_gfscreen_settings(plans: dict, settings: dict) -> dict:
    """A copy of `plans` whose 3d_fullres configuration carries a gfscreen block of `settings`."""
    plans = json.loads(json.dumps(plans))
    plans["configurations"]["3d_fullres"]["gfscreen"] = dict(settings)
    return plans


def make_trainer(cls, plans: dict, dataset_json: dict, device: torch.device, initialize: bool = True):
    trainer = cls({**plans, "continue_training": False}, "3d_fullres", 0, dataset_json, device)
    if initialize:
        trainer.initialize()
    return trainer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Seconds spent inside wrapped callables, per phase name (the device is synchronised around each call)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: Dict[str, float] = defaultdict(float)

    def wrap(self, owner, name: str, phase: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            _sync(self.device)
            t0 = time.perf_counter()
            out = original(*args, **kwargs)
            _sync(self.device)
            self.seconds[phase] += time.perf_counter() - t0
            return out
        setattr(owner, name, timed)

    def take(self) -> Dict[str, float]:
        out, self.seconds = dict(self.seconds), defaultdict(float)
        return out


def time_interleaved(trainers: Dict[str, object], iterations: int, warmup: int, seed: int = 0,
                     phases: Optional[Dict[str, PhaseTimer]] = None, after_step: Optional[Callable] = None) -> dict:
    """`time_iterations` for several trainers at once, one iteration of each in turn, so that a change in the
    machine's load (shared CPUs) hits them alike; every trainer's loader is built with the same seed."""
    phases = phases or {}
    loaders = {}
    for name, trainer in trainers.items():
        np.random.seed(seed)
        torch.manual_seed(seed)
        loaders[name] = trainer.get_dataloaders()[0]
        trainer.on_train_epoch_start()
    load, step, per_phase = defaultdict(list), defaultdict(list), defaultdict(lambda: defaultdict(list))
    for i in range(warmup + iterations):
        for name, trainer in trainers.items():
            t0 = time.perf_counter()
            batch = next(loaders[name])
            t1 = time.perf_counter()
            if name in phases:
                phases[name].take()
            trainer.train_step(batch)
            _sync(trainer.device)
            t2 = time.perf_counter()
            if after_step is not None:
                after_step(name, trainer, batch)
            if i >= warmup:
                load[name].append(t1 - t0)
                step[name].append(t2 - t1)
                if name in phases:
                    for k, v in phases[name].take().items():
                        per_phase[name][k].append(v)
    out = {}
    for name in trainers:
        total = np.add(load[name], step[name])
        out[name] = {"load_s": float(np.mean(load[name])), "step_s": float(np.mean(step[name])),
                     "iteration_s": float(np.mean(total)), "iteration_median_s": float(np.median(total)),
                     "iterations": iterations}
        if name in phases:
            out[name]["phases_s"] = {k: float(np.sum(v) / iterations) for k, v in per_phase[name].items()}
    return out


def time_iterations(trainer, iterations: int, warmup: int, seed: int = 0,
                    phases: Optional[PhaseTimer] = None, after_step: Optional[Callable] = None) -> dict:
    """Per-iteration seconds of `trainer` (data loading and train_step apart), mean and median over `iterations`
    after `warmup`; with `phases`, the mean seconds per iteration of each wrapped phase too. The seed is set
    before the loaders are built, so trainers built the same way draw the same cases."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    dl, _ = trainer.get_dataloaders()
    trainer.on_train_epoch_start()
    load, step, per_phase = [], [], defaultdict(list)
    for i in range(warmup + iterations):
        t0 = time.perf_counter()
        batch = next(dl)
        t1 = time.perf_counter()
        if phases is not None:
            phases.take()
        trainer.train_step(batch)
        _sync(trainer.device)
        t2 = time.perf_counter()
        if after_step is not None:
            after_step(trainer, batch)
        if i >= warmup:
            load.append(t1 - t0)
            step.append(t2 - t1)
            if phases is not None:
                for k, v in phases.take().items():
                    per_phase[k].append(v)
    total = np.add(load, step)
    out = {"load_s": float(np.mean(load)), "step_s": float(np.mean(step)), "iteration_s": float(np.mean(total)),
           "iteration_median_s": float(np.median(total)), "iterations": iterations}
    if phases is not None:
        out["phases_s"] = {k: float(np.sum(v) / iterations) for k, v in per_phase.items()}
    return out
