"""Per-case GF-Screen report: which tiles the Glance selected, the time per stage, predicted lesions.

Its schema is `core.case_report.CaseReport`, which the evaluator (`evaluation/report_metrics.py`) reads back.
"""
import math
from typing import List, Optional, Sequence

import numpy as np

from nnunetv2_gfscreen.core.lesions import label_lesions
from nnunetv2_gfscreen.core.case_report import CaseReport, LesionReport, TileReport
from nnunetv2_gfscreen.core.records import Box, SlidingWindowRecord


def tile_bbox_to_original(bbox: Box, preprocessed_shape: Sequence[int], properties: dict,
                          transpose_backward: Sequence[int]) -> Box:
    """Map a half-open box in preprocessed voxels to the original image array.

    Undo the resampling (scale by shape_after_cropping_and_before_resampling / preprocessed shape,
    rounding outward), add the crop offset (`bbox_used_for_cropping`), then undo nnU-Net's
    transpose. Clipped to `shape_before_cropping`.
    """
    before_resampling = properties['shape_after_cropping_and_before_resampling']
    crop = properties['bbox_used_for_cropping']
    full = properties['shape_before_cropping']
    if not (len(bbox) == len(preprocessed_shape) == len(before_resampling) == len(crop) == len(transpose_backward)):
        raise ValueError(f"dimension mismatch: bbox {bbox}, preprocessed shape {preprocessed_shape}, "
                         f"properties shape {before_resampling}, transpose_backward {transpose_backward}")
    transposed = []
    for (lo, hi), n_pre, n_orig, (c0, _), n_full in zip(bbox, preprocessed_shape, before_resampling, crop, full):
        scale = n_orig / n_pre
        lo_o = min(max(int(math.floor(lo * scale + 1e-6)), 0), n_orig) + c0
        hi_o = min(max(int(math.ceil(hi * scale - 1e-6)), 0), n_orig) + c0
        transposed.append([min(lo_o, n_full), min(hi_o, n_full)])
    return [transposed[a] for a in transpose_backward]


def lesion_components(mask: np.ndarray, spacing: Sequence[float]) -> List[LesionReport]:
    """26-connected components of mask > 0 (z, y, x) with voxel counts, mm^3 volumes and centroids (voxel index)."""
    if mask.ndim != 3 or len(spacing) != 3:
        raise ValueError(f"expected a 3D mask and 3 spacings, got shape {mask.shape} and spacing {spacing}")
    labels, n = label_lesions(mask)
    if n == 0:
        return []
    voxel_mm3 = float(np.prod(spacing))
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    coords = np.nonzero(labels)
    ids = labels[coords]
    lesions = []
    for i in range(1, n + 1):
        centroid = [float(np.sum(c[ids == i]) / counts[i]) for c in coords]
        lesions.append({"voxels": int(counts[i]), "volume_mm3": round(float(counts[i]) * voxel_mm3, 3),
                        "centroid_zyx": [round(c, 2) for c in centroid]})
    return sorted(lesions, key=lambda d: -d["voxels"])


def build_case_report(case: str, records: Sequence[SlidingWindowRecord], properties: dict,
                      transpose_backward: Sequence[int], lesions: List[LesionReport],
                      total_seconds: float) -> CaseReport:
    """The report dict of one case from the sliding-window records of its folds.

    With several folds (an ensemble), every fold's record holds the case's shared decision; a tile counts as
    selected if any fold predicted it, Glance/Focus seconds are summed and `folds` lists the per-fold numbers.
    A dense run that did not score its tiles reports no scores (None).
    """
    if not records:
        raise ValueError(f"case {case}: no sliding-window record (was the GF-Screen predictor used?)")
    first = records[0]
    if any(r.bboxes != first.bboxes for r in records):
        raise ValueError(f"case {case}: folds tiled the image differently")
    scores = first.scores if first.scores else [None] * len(first.bboxes)
    selected = np.any([r.selected for r in records], axis=0) if first.bboxes else []
    grown = np.any([r.grown for r in records], axis=0) if first.bboxes and first.grown else [False] * len(scores)
    tiles = [TileReport(bbox_original=tile_bbox_to_original(b, first.image_shape, properties, transpose_backward),
                        score=None if s is None else float(s), selected=bool(k), grown=bool(g))
             for b, s, k, g in zip(first.bboxes, scores, selected, grown)]
    n_sel = int(np.sum(selected))
    report: CaseReport = {
        "case": case,
        "tiles_total": len(tiles),
        "tiles_selected": n_sel,
        "selection_ratio": round(n_sel / len(tiles), 4) if tiles else 0.0,
        "glance_seconds": round(sum(r.glance_seconds for r in records), 4),
        "focus_seconds": round(sum(r.focus_seconds for r in records), 4),
        "total_seconds": round(float(total_seconds), 4),
        "threshold": float(first.threshold),
        "dense": bool(first.dense),
        "gate": {"rule": first.rule, "calibrated": bool(first.rule and first.rule.get("calibrated")),
                 "tiles_by_floor": first.tiles_by_floor, "fallback": first.fallback,
                 "tiles_by_fallback": first.tiles_by_fallback, "tiles_grown": int(np.sum(grown)),
                 "baseline_logit": None if np.isnan(first.statistic) else round(first.statistic, 4)},
        "tiles": tiles,
        "lesions": lesions,
    }
    if len(records) > 1:
        report["folds"] = [{"threshold": r.threshold, "tiles_selected": r.tiles_selected,
                            "glance_seconds": round(r.glance_seconds, 4), "focus_seconds": round(r.focus_seconds, 4)}
                           for r in records]
    return report


def save_case_png(image: np.ndarray, mask: np.ndarray, report: CaseReport, path: str, projection: str = "max",
                  spacing_zyx: Optional[Sequence[float]] = None) -> str:
    """The predictor's picture of a case (it knows no ground truth): max (or mean) projections of the CT
    (z, y, x) in three views with the tiles' Glance scores, the selected tiles and the predicted lesions
    (``evaluation.figures.render_case_figure``). spacing_zyx (mm, optional) draws voxels to scale."""
    if projection not in ("max", "mean"):
        raise ValueError(f"projection must be 'max' or 'mean', got {projection!r}")
    if image.shape != mask.shape or image.ndim != 3:
        raise ValueError(f"image {image.shape} and mask {mask.shape} must be 3D arrays of one shape")
    from nnunetv2_gfscreen.evaluation.figures import render_case_figure

    numbers = {k: report[k] for k in ("case", "tiles_selected", "tiles_total", "selection_ratio", "dense")
               if report.get(k) is not None}
    if report.get("lesions") is not None:
        numbers["n_pred_components"] = len(report["lesions"])
    return render_case_figure(np.asarray(image), None, mask, report, path, numbers,
                              views="mip" if projection == "max" else "mean", spacing_zyx=spacing_zyx)
