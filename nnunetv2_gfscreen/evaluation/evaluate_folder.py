"""Evaluate a folder of FLARE-style predictions (``<case>.nii.gz``, labels 0/1) against the GT.

Per case: FLARE DSC / NSD (2 mm, GT spacing), lesion detection counts (also per lesion-volume bin, GT
lesion volume in mm^3 with the GT spacing) and, when a predictor
report ``<case>.json`` exists, its timing / selection numbers and Glance tile confusion counts.
Aggregates pool these over the folder. With ``--png`` (and ``-img``, the images ``<case>_0000.nii.gz``)
each case also gets a picture ``<png_dir>/<case>.png`` (``figures.render_case_figure``): three views
with the Glance scores and selected tiles of the report, the GT and the predicted lesions and the
case's numbers. CLI: ``nnUNetv2_gfscreen_evaluate``.
"""
import argparse
import json
import multiprocessing
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnunetv2_gfscreen.evaluation.figure_data import title_numbers_from
from nnunetv2_gfscreen.evaluation.figures import VIEWS, render_case_figure
from nnunetv2_gfscreen.evaluation.detection import aggregate_detection, lesion_detection_counts
from nnunetv2_gfscreen.evaluation.metrics import FLARE_NSD_TOLERANCE_MM, flare_dsc_nsd
from nnunetv2_gfscreen.core.case_report import load_report
from nnunetv2_gfscreen.evaluation.report_metrics import aggregate_reports, summarize_report
from nnunetv2_gfscreen.evaluation.tables import format_results_markdown

FILE_ENDING = ".nii.gz"
IMAGE_SUFFIX = "_0000" + FILE_ENDING  # nnU-Net raw: channel 0 of <case>
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
                  tolerance_mm: float = FLARE_NSD_TOLERANCE_MM, image_file: Optional[str] = None,
                  png_file: Optional[str] = None, png_views: str = "slices") -> dict:
    """All per-case numbers for one case; raises when shapes or spacings disagree.

    With ``png_file`` (needs ``image_file``) the case's figure is written there too, with the
    report's tiles when there is a report and without tile shading otherwise.
    """
    if png_file is not None and image_file is None:
        raise ValueError(f"case {case}: a figure needs the image file")
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
              **lesion_detection_counts(gt, pred, float(np.prod(spacing)))}
    report = load_report(report_file) if report_file is not None else None
    if report is not None:
        result["report"] = summarize_report(report, gt, case)
    if png_file is not None:
        image = sitk.GetArrayFromImage(sitk.ReadImage(image_file))
        if image.shape != gt.shape:
            raise ValueError(f"case {case}: image {image_file} has shape {image.shape}, the ground "
                             f"truth {gt.shape} (z, y, x)")
        render_case_figure(image, gt, pred, report, png_file, title_numbers_from(result, report),
                           views=png_views, spacing_zyx=spacing)
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
                     tolerance_mm: float = FLARE_NSD_TOLERANCE_MM, image_folder: Optional[str] = None,
                     png_dir: Optional[str] = None, png_views: str = "slices") -> dict:
    """Evaluate every GT case; returns ``{"settings", "aggregate", "per_case"}``.

    Every GT case needs a prediction (extra predictions are ignored); reports are optional per
    case. Per-case report numbers are flattened into the case entries. With ``png_dir`` every case
    also gets ``<png_dir>/<case>.png``; then ``image_folder`` must hold ``<case>_0000.nii.gz`` for
    every GT case. ``png_views``: ``'slices'`` (through the largest lesion and every missed one) or ``'mip'``.
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
    image_files: Dict[str, Optional[str]] = dict.fromkeys(gt_cases)
    png_files: Dict[str, Optional[str]] = dict.fromkeys(gt_cases)
    if png_dir is not None:
        if png_views not in VIEWS:
            raise ValueError(f"png_views must be one of {VIEWS}, got {png_views!r}")
        if image_folder is None:
            raise ValueError("figures (png_dir) need the image folder with <case>_0000.nii.gz")
        if not os.path.isdir(image_folder):
            raise FileNotFoundError(f"image folder does not exist: {image_folder}")
        image_files = {c: os.path.join(image_folder, c + IMAGE_SUFFIX) for c in gt_cases}
        missing = [c for c, f in image_files.items() if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} ground-truth case(s) have no image "
                                    f"<case>{IMAGE_SUFFIX} in {image_folder}: {', '.join(missing)}")
        os.makedirs(png_dir, exist_ok=True)
        png_files = {c: os.path.join(png_dir, c + ".png") for c in gt_cases}
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    jobs = [(c, os.path.join(pred_folder, c + FILE_ENDING), os.path.join(gt_folder, c + FILE_ENDING),
             report_files[c], tolerance_mm, image_files[c], png_files[c], png_views) for c in gt_cases]
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
    if png_dir is not None:
        settings.update(image_folder=os.path.abspath(image_folder), png_dir=os.path.abspath(png_dir),
                        png_views=png_views)
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
    parser.add_argument("--png", action="store_true",
                        help="also write one picture per case (three views; Glance scores and selected tiles "
                             "from -reports; GT and predicted lesions; the case's numbers). Needs -img")
    parser.add_argument("-img", type=str, required=False, default=None,
                        help="folder with the images <case>_0000.nii.gz (required with --png)")
    parser.add_argument("--png_dir", type=str, required=False, default=None,
                        help="folder for the pictures. Default: figures/ next to the output JSON")
    parser.add_argument("--png_views", type=str, required=False, default="slices", choices=("slices", "mip"),
                        help="'slices' through the largest GT (else predicted) lesion, plus a row through every GT "
                             "lesion the prediction missed (outlined in red, with the stage that lost it: gate or "
                             "Focus), or maximum-intensity projections ('mip'). Default: slices")
    args = parser.parse_args()
    if args.png and args.img is None:
        parser.error("--png needs -img (the folder with <case>_0000.nii.gz)")
    if not args.png and (args.png_dir is not None or args.png_views != "slices"):
        parser.error("--png_dir / --png_views only apply with --png")
    json_file = args.o if args.o is not None else os.path.join(args.pred, "gfscreen_summary.json")
    png_dir = None
    if args.png:
        png_dir = args.png_dir if args.png_dir is not None else \
            os.path.join(os.path.dirname(os.path.abspath(json_file)), "figures")
    result = evaluate_folders(args.pred, args.gt, args.reports, args.np, image_folder=args.img,
                              png_dir=png_dir, png_views=args.png_views)
    write_results(result, json_file, args.md)
    agg = result["aggregate"]
    print(f"{agg['n_cases']} cases: DSC {agg['dsc_mean']:.4f}, NSD {agg['nsd_mean']:.4f}; "
          f"written to {json_file}" + (f" and {args.md}" if args.md else "")
          + (f"; pictures in {png_dir}" if png_dir else ""))
