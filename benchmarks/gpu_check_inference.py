"""Inference part of the GPU check (benchmarks/gpu_check.py): the four predictors on one CT and on a folder.

In-process, each predictor loaded from its trained model folder exactly as its command loads it
(`initialize_from_trained_model_folder`):
  stock dense    nnUNetv2_predict on the nnUNetTrainer model (nnU-Net's three steps timed one by one:
                 DefaultPreprocessor.run_case, predict_logits_from_preprocessed_data, export_prediction_from_logits)
  stock gated    the same on the GF-Screen model: `nnUNetv2_predict -tr GFScreenTrainer...`, the network gates itself
  ours dense     nnUNetv2_predict_gfscreen --dense (phases from its per-case report)
  ours gated     nnUNetv2_predict_gfscreen --threshold T
The gate threshold T is the quantile of the Glance's tile scores on the CT that lets `selection` of the tiles
through (the few-epoch Glance means nothing yet); the stock gated run gets T in its checkpoint parameters.
Folder throughput: predict_from_files (stock) and predict_folder (ours) with -npp/-nps background workers.
Whole commands (`run_commands_stage`): benchmarks/bench_commands.py's table on a few of the check's test cases.
"""
import os
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from command_probe import counting_gate
from timing import Peak, predict_case, stock_case_phases

PREDICTORS = ("stock dense", "stock gated", "ours dense", "ours gated")


def load_predictors(stock_folder: str, gfscreen_folder: str, device: torch.device, threshold_selection: float,
                    probe_case: List[str], work: str) -> Dict[str, object]:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2_gfscreen.core.gate import Gate, GateRule
    from nnunetv2_gfscreen.predictors.gfscreen_predictor import GFScreenPredictor

    on_device = device.type == "cuda"
    kw = dict(tile_step_size=0.5, use_gaussian=True, use_mirroring=True, perform_everything_on_device=on_device,
              device=device, verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    preds = {"stock dense": nnUNetPredictor(**kw), "stock gated": nnUNetPredictor(**kw),
             "ours dense": GFScreenPredictor(**kw, dense=True), "ours gated": GFScreenPredictor(**kw)}
    preds["stock dense"].initialize_from_trained_model_folder(stock_folder, (0,), "checkpoint_final.pth")
    for name in ("stock gated", "ours dense", "ours gated"):
        preds[name].initialize_from_trained_model_folder(gfscreen_folder, (0,), "checkpoint_final.pth")
    # the threshold (a logit) that lets `threshold_selection` of this CT's tiles through: the tiles scored by a
    # dense run that scores them (--dense --score_tiles)
    probe = GFScreenPredictor(**{**kw, "use_mirroring": False}, dense=True, score_dense=True)
    probe.initialize_from_trained_model_folder(gfscreen_folder, (0,), "checkpoint_final.pth")
    os.makedirs(os.path.join(work, "probe"), exist_ok=True)
    report = predict_case(probe, probe_case, os.path.join(work, "probe", "case"), os.path.join(work, "probe_reports"))
    scores = np.array([t["score"] for t in report["tiles"]], dtype=np.float64)
    threshold = float(np.quantile(scores, 1 - threshold_selection))
    # a few epochs teach the Glance and the Focus nothing: the rule is the threshold alone (no floor, no fallback
    # envelope) and the selection does not grow where the untrained Focus marks lesion at its border
    preds["ours gated"].rule, preds["ours gated"].border_growth = GateRule(threshold=threshold), False
    for params in preds["stock gated"].list_of_parameters:  # the stock path reads the gate from the weights
        Gate.write_rule_into_state_dict(params, GateRule(threshold=threshold))
    preds["threshold"] = threshold
    preds["probe_tiles"] = len(scores)
    return preds


def one_case(name: str, p, files: List[str], work: str, device: torch.device) -> dict:
    """One CT end to end (read .. mask written), with its phases and the share of tiles the Focus saw."""
    out = os.path.join(work, name.replace(" ", "_") + ("_tta" if p.use_mirroring else ""), "case")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with Peak(device) as peak:
        if name.startswith("stock"):
            with counting_gate({}) as counts:  # the gated network's tiles (a flipped TTA copy is not counted)
                phases = stock_case_phases(p, files, out, device)
            selection = counts["gate_tiles_selected"] / max(1, counts["gate_tiles_scored"]) \
                if name == "stock gated" else None
        else:
            rep = predict_case(p, files, out, os.path.join(work, "reports"))
            phases = {"preprocess": rep["preprocess_seconds"], "sliding_window": rep["sliding_window_seconds"],
                      "export": rep["export_seconds"], "total": rep["total_seconds"]}
            selection = rep["selection_ratio"]
    return {"predictor": name, "tta": bool(p.use_mirroring), **phases, "selection_ratio": selection,
            "peak_gpu_memory_gib": peak.gib}


def folder(name: str, p, in_folder: str, work: str, device: torch.device, npp: int, nps: int) -> dict:
    from nnunetv2_gfscreen.predictors.cli import predict_folder
    out = os.path.join(work, "folder_" + name.replace(" ", "_"))
    n = len([f for f in os.listdir(in_folder) if f.endswith("_0000.nii.gz")])
    with Peak(device) as peak:
        t0 = time.perf_counter()
        if name.startswith("stock"):
            p.predict_from_files(in_folder, out, save_probabilities=False, overwrite=True,
                                 num_processes_preprocessing=npp, num_processes_segmentation_export=nps)
        else:
            predict_folder(p, in_folder, out, num_processes_preprocessing=npp, num_processes_segmentation_export=nps)
        wall = time.perf_counter() - t0
    return {"predictor": name, "tta": bool(p.use_mirroring), "cases": n, "seconds": wall,
            "cases_per_minute": 60 * n / wall, "peak_gpu_memory_gib": peak.gib}


def run_one_case(preds: dict, case_files: List[str], work: str, device: torch.device,
                 time_left: Callable[[], float]) -> dict:
    """Warm-up, then one CT with TTA on and off; a run that would not fit in the remaining budget (estimated from
    the runs so far) is skipped and listed as such. Returns the inference result (`run_folder` adds to it)."""
    result = {"one_case": [], "folder": [], "skipped": []}
    for name in PREDICTORS:  # warm-up: CUDA kernels, cudnn autotuning, caches
        preds[name].use_mirroring = False
        one_case(name, preds[name], case_files, os.path.join(work, "warm"), device)
    for tta in (True, False):
        for name in PREDICTORS:
            estimate = max([r["total"] for r in result["one_case"] if r["predictor"] == name], default=0.0)
            if time_left() < estimate:
                result["skipped"].append(f"one case {name} TTA {tta}: budget")
                continue
            preds[name].use_mirroring = tta
            result["one_case"].append(one_case(name, preds[name], case_files, work, device))
    return result


def run_folder(preds: dict, result: dict, in_folder: str, work: str, device: torch.device, npp: int, nps: int,
               time_left: Callable[[], float]) -> dict:
    """The folder with TTA, each predictor in-process, added to `result` (skipped when the budget, estimated from
    the one-case runs, does not allow it)."""
    n = len([f for f in os.listdir(in_folder) if f.endswith("_0000.nii.gz")])
    for name in PREDICTORS:
        estimate = 0.5 * n * max([r["total"] for r in result["one_case"] if r["predictor"] == name], default=0.0)
        if time_left() < estimate:
            result["skipped"].append(f"folder {name}: budget (about {estimate:.0f} s needed)")
            continue
        preds[name].use_mirroring = True
        result["folder"].append(folder(name, preds[name], in_folder, work, device, npp, nps))
    return result


def run_commands_stage(gfscreen_model: str, threshold: float, test_folder: str, n_cases: int, work: str,
                       device: str, npp: int, nps: int, time_left: Callable[[], float]) -> dict:
    """bench_commands.py's table on this check's data: the four commands (stock on a plain nnU-Net twin of the
    GF-Screen model, stock -tr GF-Screen, ours gated and --dense), each a fresh process, TTA off and on, on the
    first `n_cases` test cases; as in `load_predictors`, the copies of the model gate by the forced threshold
    alone (and get TTA axes), and ours runs with --no_border_growth."""
    import shutil
    from pathlib import Path
    from bench_commands import Setup, install_models, run_commands, table
    from nnunetv2_gfscreen.core.gate import GateRule
    in_folder = os.path.join(work, "commands_input")
    os.makedirs(in_folder, exist_ok=True)
    for name in sorted(f for f in os.listdir(test_folder) if f.endswith("_0000.nii.gz"))[:n_cases]:
        shutil.copy(os.path.join(test_folder, name), os.path.join(in_folder, name))
    model = Path(gfscreen_model)
    trainer, _, configuration = model.name.split("__")
    setup = Setup(os.path.join(work, "commands_results"), model.parent.name, configuration, trainer, in_folder,
                  device, npp, nps, ("--no_border_growth",))
    install_models(setup, model, GateRule(threshold=threshold))
    result = run_commands(setup, dict(os.environ), Path(work) / "commands", time_left=time_left)
    result["table"] = table(result)
    return result


def speedups(result: dict) -> Dict[str, Optional[float]]:
    """Stock dense time over each other predictor's, per TTA setting (one case) and for the folder."""
    out: Dict[str, Optional[float]] = {}
    for tta in (True, False):
        rows = {r["predictor"]: r["total"] for r in result["one_case"] if r["tta"] == tta}
        for name in PREDICTORS[1:]:
            base, t = rows.get("stock dense"), rows.get(name)
            out[f"one_case_tta_{'on' if tta else 'off'}_{name.replace(' ', '_')}"] = base / t if base and t else None
    rows = {r["predictor"]: r["seconds"] for r in result["folder"]}
    for name in PREDICTORS[1:]:
        base, t = rows.get("stock dense"), rows.get(name)
        out[f"folder_{name.replace(' ', '_')}"] = base / t if base and t else None
    return out
