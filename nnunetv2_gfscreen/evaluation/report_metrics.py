"""Per-case predictor reports (``<case>.json``, schema `core.case_report.CaseReport`) against the GT.

Reports from other tools may carry only part of the schema: keys that are missing are skipped, so the
aggregates that need them are left out instead of failing.
"""
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

from nnunetv2_gfscreen.core.case_report import SCALAR_KEYS, CaseReport, TileReport

REPORT_SCALAR_KEYS = SCALAR_KEYS
TILE_COUNT_KEYS = ("tile_tp", "tile_fn", "tile_fp", "tile_tn")


def _bbox_slices(bbox: Sequence[Sequence[int]], shape: Sequence[int], case: str) -> tuple:
    ok = len(bbox) == len(shape) and all(len(b) == 2 for b in bbox)
    if ok:
        lo_hi = [(int(b[0]), int(b[1])) for b in bbox]
        ok = all(0 <= lo < hi <= s for (lo, hi), s in zip(lo_hi, shape))
    if not ok:
        raise ValueError(f"case {case}: tile bbox_original {bbox} is not a non-empty half-open box "
                         f"inside the image of shape {tuple(shape)} (z, y, x)")
    return tuple(slice(lo, hi) for lo, hi in lo_hi)


def tile_confusion(gt: np.ndarray, tiles: Iterable[TileReport], case: str = "?") -> Dict[str, int]:
    """Glance tile confusion counts for one case.

    gt: binary (z, y, x) ground truth. A tile is positive when the GT has any lesion voxel inside
    its ``bbox_original``; it is predicted positive when ``selected`` is true. Returns
    ``tile_tp`` (positive, selected), ``tile_fn`` (positive, rejected), ``tile_fp`` (negative,
    selected), ``tile_tn`` (negative, rejected).
    """
    gt = np.asarray(gt).astype(bool, copy=False)
    counts = dict.fromkeys(TILE_COUNT_KEYS, 0)
    for i, tile in enumerate(tiles):
        if "bbox_original" not in tile or "selected" not in tile:
            raise ValueError(f"case {case}: tile {i} needs 'bbox_original' and 'selected', "
                             f"has keys {sorted(tile)}")
        positive = bool(gt[_bbox_slices(tile["bbox_original"], gt.shape, case)].any())
        selected = bool(tile["selected"])
        key = ("tile_tp" if selected else "tile_fn") if positive else ("tile_fp" if selected else "tile_tn")
        counts[key] += 1
    return counts


def summarize_report(report: CaseReport, gt: np.ndarray, case: str) -> Dict[str, float]:
    """The per-case numbers a report contributes: its scalar keys and, with tiles, tile counts."""
    if "case" in report and report["case"] != case:
        raise ValueError(f"report for case {case} says it belongs to case {report['case']!r}")
    out = {k: float(report[k]) for k in REPORT_SCALAR_KEYS if report.get(k) is not None}
    if report.get("tiles") is not None:
        out.update(tile_confusion(gt, report["tiles"], case))
    return out


def _mean(values: List[float]) -> Optional[float]:
    return float(np.mean(values)) if values else None


def aggregate_reports(per_case: Iterable[Dict[str, float]]) -> Dict[str, float]:
    """Means of the scalar report keys over the cases that have them (``<key>_mean``) and pooled
    Glance tile sensitivity TP/(TP+FN) and specificity TN/(TN+FP) over all tiles.

    Aggregates without data (no case has the key, no positive tiles, ...) are omitted.
    """
    per_case = [c for c in per_case if c]
    out: Dict[str, float] = {"n_reports": len(per_case)}
    for key in REPORT_SCALAR_KEYS:
        mean = _mean([c[key] for c in per_case if key in c])
        if mean is not None:
            out[f"{key}_mean"] = mean
    with_tiles = [c for c in per_case if "tile_tp" in c]
    if with_tiles:
        tot = {k: sum(c[k] for c in with_tiles) for k in TILE_COUNT_KEYS}
        out.update({f"n_{k}": v for k, v in tot.items()})
        if tot["tile_tp"] + tot["tile_fn"] > 0:
            out["tile_sensitivity"] = tot["tile_tp"] / (tot["tile_tp"] + tot["tile_fn"])
        if tot["tile_tn"] + tot["tile_fp"] > 0:
            out["tile_specificity"] = tot["tile_tn"] / (tot["tile_tn"] + tot["tile_fp"])
    return out
