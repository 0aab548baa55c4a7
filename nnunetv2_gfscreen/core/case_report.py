"""The per-case report of a gated prediction (`<case>.json`): one schema for its writer (predictors/case_summary.py)
and its readers (evaluation/report_metrics.py, evaluation/gate.py, evaluation/figures.py).

Tile boxes are in the ORIGINAL image's array index order (as the image reader returns it; SimpleITK: z, y, x),
half-open and clipped, so they can be laid over the ground truth directly.
"""
import json
import os
from typing import List, Optional, TypedDict

from nnunetv2_gfscreen.atomic import write_json


class TileReport(TypedDict):
    bbox_original: List[List[int]]  # [[z0, z1], [y0, y1], [x0, x1]], half-open
    score: Optional[float]          # Glance logit (mean over folds for an ensemble); None: a dense run, unscored
    selected: bool                  # sent to the Focus (by the gate or by border growth)
    grown: bool                     # added by border growth


class GateReport(TypedDict):
    rule: Optional[dict]            # core.gate.GateRule.to_dict() the case was gated with (None: dense, unscored)
    calibrated: bool                # False: the gate was never calibrated (p(select) > 0.5)
    tiles_by_floor: int             # tiles the floor added beyond the threshold's
    fallback: bool                  # the case's baseline logit fell outside the calibration envelope
    tiles_by_fallback: int
    tiles_grown: int                # tiles border growth added
    baseline_logit: Optional[float]  # 10th-percentile tile logit, the fallback's statistic
    calibration: dict               # calibration.certificate_summary of the model's record (nnUNetv2_predict_gfscreen)


class LesionReport(TypedDict):
    voxels: int
    volume_mm3: float
    centroid_zyx: List[float]


class FoldReport(TypedDict):
    threshold: float
    tiles_selected: int
    glance_seconds: float
    focus_seconds: float


class _CaseReportRequired(TypedDict):
    case: str
    tiles_total: int
    tiles_selected: int
    selection_ratio: float
    glance_seconds: float
    focus_seconds: float
    total_seconds: float
    threshold: float                # logit units
    dense: bool
    gate: GateReport
    tiles: List[TileReport]
    lesions: List[LesionReport]  # 26-connected components of the predicted mask, largest first


class CaseReport(_CaseReportRequired, total=False):
    folds: List[FoldReport]          # an ensemble's per-fold numbers
    torch_io: bool
    preprocess_seconds: float
    sliding_window_seconds: float
    export_seconds: float


# the per-case timings and ratio the evaluator averages over cases
SCALAR_KEYS = ("selection_ratio", "glance_seconds", "focus_seconds", "total_seconds")


def write_case_report(report: CaseReport, report_dir: str) -> str:
    """Write `<report_dir>/<case>.json` atomically; returns the path."""
    os.makedirs(report_dir, exist_ok=True)
    path = os.path.join(report_dir, f"{report['case']}.json")
    return write_json(report, path)


def load_report(path: str) -> CaseReport:
    """Read one report; a file that is not a JSON object raises an error naming the path."""
    with open(path) as f:
        try:
            report = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"predictor report {path} is not valid JSON: {e}") from e
    if not isinstance(report, dict):
        raise ValueError(f"predictor report {path} must hold a JSON object, got {type(report).__name__}")
    return report
