"""Timing helpers shared by the benchmarks (scripts in this folder import it: their folder is on sys.path): GPU
sync, peak memory, the stock predictor's phases and ours for one case."""
import os
import time
from typing import Dict, List

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Peak:
    """Peak GPU memory (GiB) allocated inside the block; None on the CPU."""

    def __init__(self, device: torch.device):
        self.device, self.gib = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.gib = torch.cuda.max_memory_allocated(self.device) / 2 ** 30


def stock_case_phases(p, files: List[str], out_truncated: str, device: torch.device) -> Dict[str, float]:
    """One case through a stock nnUNetPredictor `p`, timed per phase: nnU-Net's preprocessing, its sliding window
    (all folds), its export."""
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    t0 = time.perf_counter()
    pre = p.configuration_manager.preprocessor_class(verbose=False)
    data, _, props = pre.run_case(files, None, p.plans_manager, p.configuration_manager, p.dataset_json)
    data = torch.from_numpy(data).to(dtype=torch.float32, memory_format=torch.contiguous_format)
    t1 = time.perf_counter()
    logits = p.predict_logits_from_preprocessed_data(data).cpu()
    sync(device)
    t2 = time.perf_counter()
    export_prediction_from_logits(logits, props, p.configuration_manager, p.plans_manager, p.dataset_json,
                                  out_truncated, False)
    t3 = time.perf_counter()
    return {"preprocess": t1 - t0, "sliding_window": t2 - t1, "export": t3 - t2, "total": t3 - t0}


def predict_case(predictor, image_files: List[str], output_file_truncated: str, report_dir: str, png: bool = False,
                 save_probabilities: bool = False) -> dict:
    """One case through `nnUNetv2_predict_gfscreen`'s stages (preprocess, gated sliding window, export + report), in
    this thread, as `predict_folder` runs each case; returns the case report, written after the mask.

    total_seconds = read start .. mask written; the report also holds preprocess_seconds,
    sliding_window_seconds and export_seconds (export + write)."""
    from nnunetv2_gfscreen.predictors.cli import _CaseState, _export_stage, _predict_stage, _preprocess_stage
    state = _CaseState(os.path.basename(output_file_truncated), list(image_files), output_file_truncated)
    state = _predict_stage(predictor, _preprocess_stage(predictor, state))
    return _export_stage(predictor, state, report_dir, png, save_probabilities, torch.get_num_threads())
