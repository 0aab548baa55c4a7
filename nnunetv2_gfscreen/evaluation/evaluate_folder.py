"""Evaluate a folder of FLARE-style predictions (``<case>.nii.gz``, labels 0/1) against the GT.

Per case: FLARE DSC / NSD (2 mm, GT spacing), lesion detection counts and, when a predictor
report ``<case>.json`` exists, its timing / selection numbers and Glance tile confusion counts.
Aggregates pool these over the folder. CLI: ``nnUNetv2_gfscreen_evaluate``.
"""
import argparse
import json
import multiprocessing
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnunetv2_gfscreen.evaluation.lesions import aggregate_detection, lesion_detection_counts
from nnunetv2_gfscreen.evaluation.metrics import FLARE_NSD_TOLERANCE_MM, flare_dsc_nsd
from nnunetv2_gfscreen.evaluation.reports import aggregate_reports, load_report, summarize_report
from nnunetv2_gfscreen.evaluation.tables import format_results_markdown

FILE_ENDING = ".nii.gz"
DEFAULT_NUM_PROCESSES = 3
SPACING_RTOL = 1e-4


def list_cases(folder: str, what: str) -> List[str]:
    """Sorted case names of the ``<case>.nii.gz`` files in ``folder``; errors when there are none."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{what} folder does not exist: {folder}")
    cases = sorted(f[:-len(FILE_ENDING)] for f in os.listdir(folder) if f.endswith(FILE_ENDING))
    if not cases:
        raise ValueError(f"{what} folder {folder} holds no *{FILE_ENDING} files")
    return cases


def _read_binary(path: str, case: str, what: str) -> Tuple[np.ndarray, Tuple[float, ...]]:
    """(z, y, x) bool mask and its spacing in (z, y, x) order; labels other than 0/1 are an error."""
    image = sitk.ReadImage(path)
    array = sitk.GetArrayFromImage(image)
    labels = np.unique(array)
    bad = labels[(labels != 0) & (labels != 1)]
    if bad.size:
        raise ValueError(f"case {case}: {what} {path} has labels {bad.tolist()[:10]}, only 0 and 1 "
                         f"are allowed (binary lesion masks)")
    return array.astype(bool), tuple(image.GetSpacing())[::-1]


def evaluate_case(case: str, pred_file: str, gt_file: str, report_file: Optional[str] = None,
                  tolerance_mm: float = FLARE_NSD_TOLERANCE_MM) -> dict:
    """All per-case numbers for one case; raises when shapes or spacings disagree."""
    gt, spacing = _read_binary(gt_file, case, "ground truth")
    pred, pred_spacing = _read_binary(pred_file, case, "prediction")
    if gt.shape != pred.shape:
        raise ValueError(f"case {case}: prediction shape {pred.shape} differs from ground truth "
                         f"shape {gt.shape} (z, y, x)")
    if not np.allclose(pred_spacing, spacing, rtol=SPACING_RTOL, atol=0):
        raise ValueError(f"case {case}: prediction spacing {pred_spacing[::-1]} differs from ground "
                         f"truth spacing {spacing[::-1]} (x, y, z)")
    dsc, nsd = flare_dsc_nsd(gt, pred, spacing, tolerance_mm)
    result = {"case": case, "dsc": dsc, "nsd": nsd,
              "gt_voxels": int(gt.sum()), "pred_voxels": int(pred.sum()),
              **lesion_detection_counts(gt, pred)}
    if report_file is not None:
        result["report"] = summarize_report(load_report(report_file), gt, case)
    return result


def _evaluate_case_star(args: tuple) -> dict:
    return evaluate_case(*args)


def aggregate(per_case: List[dict]) -> dict:
    """Folder-level numbers: mean DSC / NSD over all cases (healthy ones included, as FLARE does),
    pooled detection rates (``lesions.aggregate_detection``) and report aggregates
    (``reports.aggregate_reports``) when any case has a report."""
    out = {"n_cases": len(per_case),
           "dsc_mean": float(np.mean([c["dsc"] for c in per_case])),
           "nsd_mean": float(np.mean([c["nsd"] for c in per_case])),
           **aggregate_detection(per_case)}
    reports = [c["report"] for c in per_case if "report" in c]
    if reports:
        out.update(aggregate_reports(reports))
    return out


def evaluate_folders(pred_folder: str, gt_folder: str, reports_folder: Optional[str] = None,
                     num_processes: int = DEFAULT_NUM_PROCESSES,
                     tolerance_mm: float = FLARE_NSD_TOLERANCE_MM) -> dict:
    """Evaluate every GT case; returns ``{"settings", "aggregate", "per_case"}``.

    Every GT case needs a prediction (extra predictions are ignored); reports are optional per
    case. Per-case report numbers are flattened into the case entries.
    """
    gt_cases = list_cases(gt_folder, "ground truth")
    pred_cases = set(list_cases(pred_folder, "prediction"))
    missing = [c for c in gt_cases if c not in pred_cases]
    if missing:
        raise FileNotFoundError(f"{len(missing)} ground-truth case(s) have no prediction in "
                                f"{pred_folder}: {', '.join(missing)}")
    report_files: Dict[str, Optional[str]] = dict.fromkeys(gt_cases)
    if reports_folder is not None:
        if not os.path.isdir(reports_folder):
            raise FileNotFoundError(f"reports folder does not exist: {reports_folder}")
        for c in gt_cases:
            path = os.path.join(reports_folder, c + ".json")
            report_files[c] = path if os.path.isfile(path) else None
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    jobs = [(c, os.path.join(pred_folder, c + FILE_ENDING), os.path.join(gt_folder, c + FILE_ENDING),
             report_files[c], tolerance_mm) for c in gt_cases]
    n_proc = min(num_processes, len(jobs))
    if n_proc > 1:
        with multiprocessing.get_context("spawn").Pool(n_proc) as pool:
            per_case = list(tqdm(pool.imap(_evaluate_case_star, jobs), total=len(jobs),
                                 desc="evaluating"))
    else:
        per_case = [_evaluate_case_star(j) for j in tqdm(jobs, desc="evaluating")]
    agg = aggregate(per_case)
    per_case = [{**{k: v for k, v in c.items() if k != "report"}, **c.get("report", {})}
                for c in per_case]
    settings = {"pred_folder": os.path.abspath(pred_folder), "gt_folder": os.path.abspath(gt_folder),
                "reports_folder": None if reports_folder is None else os.path.abspath(reports_folder),
                "nsd_tolerance_mm": tolerance_mm}
    return {"settings": settings, "aggregate": agg, "per_case": per_case}


def write_results(result: dict, json_file: Optional[str] = None, md_file: Optional[str] = None) -> None:
    """Write ``evaluate_folders`` output as JSON and / or Markdown (folders are created)."""
    for path, text in ((json_file, lambda: json.dumps(result, indent=2)),
                       (md_file, lambda: format_results_markdown(result))):
        if path is None:
            continue
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text())


def evaluate_entry_point() -> None:
    parser = argparse.ArgumentParser(description="FLARE pan-cancer evaluation of a prediction folder "
                                                 "(DSC, NSD, lesion detection, GF-Screen reports).")
    parser.add_argument("-pred", type=str, required=True, help="folder with predicted <case>.nii.gz")
    parser.add_argument("-gt", type=str, required=True, help="folder with ground-truth <case>.nii.gz")
    parser.add_argument("-reports", type=str, required=False, default=None,
                        help="optional folder with the predictor's <case>.json reports")
    parser.add_argument("-o", type=str, required=False, default=None,
                        help="output JSON. Default: PRED/gfscreen_summary.json")
    parser.add_argument("--md", type=str, required=False, default=None,
                        help="optional Markdown output (aggregate and per-case tables)")
    parser.add_argument("-np", type=int, required=False, default=DEFAULT_NUM_PROCESSES,
                        help=f"number of processes. Default: {DEFAULT_NUM_PROCESSES}")
    args = parser.parse_args()
    result = evaluate_folders(args.pred, args.gt, args.reports, args.np)
    json_file = args.o if args.o is not None else os.path.join(args.pred, "gfscreen_summary.json")
    write_results(result, json_file, args.md)
    agg = result["aggregate"]
    print(f"{agg['n_cases']} cases: DSC {agg['dsc_mean']:.4f}, NSD {agg['nsd_mean']:.4f}; "
          f"written to {json_file}" + (f" and {args.md}" if args.md else ""))
