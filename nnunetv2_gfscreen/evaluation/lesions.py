"""Lesion-level and case-level detection counts from 3D connected components.

A lesion is a 26-connected component of the ground truth; a predicted component is a
26-connected component of the prediction. Overlap means at least one shared foreground voxel.
"""
from typing import Dict, Iterable, Optional

import numpy as np

from nnunetv2_gfscreen.core.lesions import label_lesions


def lesion_detection_counts(gt: np.ndarray, pred: np.ndarray) -> Dict[str, int]:
    """Per-case detection counts for two binary (z, y, x) masks of equal shape.

    Returns ``n_lesions`` (GT components), ``n_found`` (GT components that some predicted voxel
    overlaps), ``n_pred_components``, ``n_tp_components`` (predicted components overlapping some
    GT voxel) and ``n_fp_components`` (predicted components overlapping none).
    """
    gt = np.asarray(gt).astype(bool, copy=False)
    pred = np.asarray(pred).astype(bool, copy=False)
    if gt.shape != pred.shape or gt.ndim != 3:
        raise ValueError(f"gt and pred must be 3D masks of one shape, got {gt.shape} and {pred.shape}")
    gt_labels, n_lesions = label_lesions(gt)
    pred_labels, n_pred = label_lesions(pred)
    found = np.unique(gt_labels[pred])
    tp = np.unique(pred_labels[gt])
    n_found = int(np.count_nonzero(found))
    n_tp = int(np.count_nonzero(tp))
    return {"n_lesions": int(n_lesions), "n_found": n_found, "n_pred_components": int(n_pred),
            "n_tp_components": n_tp, "n_fp_components": int(n_pred) - n_tp}


def _ratio(num: float, den: float) -> Optional[float]:
    return None if den == 0 else num / den


def aggregate_detection(per_case: Iterable[Dict[str, int]]) -> Dict[str, Optional[float]]:
    """Pool per-case counts (``lesion_detection_counts`` output) over a set of cases.

    - ``lesion_sensitivity`` (= lesion recall): found GT lesions / all GT lesions.
    - ``lesion_precision``: predicted components that overlap a GT lesion / all predicted
      components. Precision is over predicted components, recall over GT lesions, so a predicted
      blob touching two lesions counts once in precision and finds both lesions in recall.
    - ``lesion_f1`` = 2PR / (P + R); 0 when there are predictions but no lesions, or lesions but
      no predictions; None when there is neither.
    - ``fp_per_case``: mean number of false-positive components per case.
    - ``case_sensitivity``: share of lesion cases (non-empty GT) with at least one lesion found.
    - ``healthy_fp_rate``: share of healthy cases (empty GT) with any predicted foreground.
    Rates with nothing to count over are None.
    """
    per_case = list(per_case)
    if not per_case:
        raise ValueError("aggregate_detection needs at least one case")
    tot = {k: sum(int(c[k]) for c in per_case) for k in
           ("n_lesions", "n_found", "n_pred_components", "n_tp_components", "n_fp_components")}
    recall = _ratio(tot["n_found"], tot["n_lesions"])
    precision = _ratio(tot["n_tp_components"], tot["n_pred_components"])
    if recall is None and precision is None:
        f1 = None
    elif recall is None or precision is None:
        f1 = 0.0  # only false positives, or only missed lesions
    else:
        f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    lesion_cases = [c for c in per_case if c["n_lesions"] > 0]
    healthy_cases = [c for c in per_case if c["n_lesions"] == 0]
    return {
        **tot,
        "lesion_sensitivity": recall,
        "lesion_precision": precision,
        "lesion_f1": f1,
        "fp_per_case": tot["n_fp_components"] / len(per_case),
        "n_lesion_cases": len(lesion_cases),
        "n_healthy_cases": len(healthy_cases),
        "case_sensitivity": _ratio(sum(c["n_found"] > 0 for c in lesion_cases), len(lesion_cases)),
        "healthy_fp_rate": _ratio(sum(c["n_pred_components"] > 0 for c in healthy_cases),
                                  len(healthy_cases)),
    }
