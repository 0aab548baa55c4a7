"""Lesion-level and case-level detection counts from 3D connected components.

A lesion is a 26-connected component of the ground truth; a predicted component is a
26-connected component of the prediction. Overlap means at least one shared foreground voxel.
Given the voxel volume, lesions are also counted per lesion-volume bin (``core.lesions.SIZE_BINS``,
mm^3 of the GT lesion), so the weakest size is visible.
"""
from typing import Dict, Iterable, List, Optional

import numpy as np

from nnunetv2_gfscreen.core.lesions import SIZE_BIN_KEYS, SIZE_BINS, label_lesions, size_bin


def size_bin_keys(prefix: str) -> List[str]:
    """Per-bin count keys, e.g. ``n_lesions_lt500``."""
    return [f"{prefix}_{k}" for k in SIZE_BIN_KEYS]


def lesion_detection_counts(gt: np.ndarray, pred: np.ndarray, voxel_volume_mm3: Optional[float] = None
                            ) -> Dict[str, int]:
    """Per-case detection counts for two binary (z, y, x) masks of equal shape.

    Returns ``n_lesions`` (GT components), ``n_found`` (GT components that some predicted voxel
    overlaps), ``n_pred_components``, ``n_tp_components`` (predicted components overlapping some
    GT voxel) and ``n_fp_components`` (predicted components overlapping none). With
    ``voxel_volume_mm3`` (the GT's voxel volume) also ``n_lesions_<bin>`` and ``n_found_<bin>`` per
    lesion-volume bin (``SIZE_BIN_KEYS``; a lesion's volume is its voxel count times the voxel volume).
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
    out = {"n_lesions": int(n_lesions), "n_found": n_found, "n_pred_components": int(n_pred),
           "n_tp_components": n_tp, "n_fp_components": int(n_pred) - n_tp}
    if voxel_volume_mm3 is not None:
        if not np.isfinite(voxel_volume_mm3) or voxel_volume_mm3 <= 0:
            raise ValueError(f"voxel_volume_mm3 must be a positive number, got {voxel_volume_mm3}")
        volumes = np.bincount(gt_labels.ravel(), minlength=n_lesions + 1)[1:] * float(voxel_volume_mm3)
        bins = size_bin(volumes)
        is_found = np.zeros(n_lesions + 1, bool)
        is_found[found] = True
        is_found = is_found[1:]
        for b, (n_key, f_key) in enumerate(zip(size_bin_keys("n_lesions"), size_bin_keys("n_found"))):
            out[n_key] = int((bins == b).sum())
            out[f_key] = int(is_found[bins == b].sum())
    return out


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
    - when every case has per-bin counts: the pooled ``n_lesions_<bin>``, ``n_found_<bin>``,
      ``lesion_sensitivity_<bin>`` and ``size_bins`` (one dict per bin: bin, key, lesions, found,
      sensitivity).
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
        **_size_bins(per_case),
    }


def _size_bins(per_case: List[Dict[str, int]]) -> dict:
    """Pooled per-bin detection (``aggregate_detection``); empty unless every case has the bin counts."""
    if not all(k in c for c in per_case for k in size_bin_keys("n_lesions")):
        return {}
    out: dict = {"size_bins": []}
    for name, key in zip(SIZE_BINS, SIZE_BIN_KEYS):
        m = sum(int(c[f"n_lesions_{key}"]) for c in per_case)
        k = sum(int(c[f"n_found_{key}"]) for c in per_case)
        out.update({f"n_lesions_{key}": m, f"n_found_{key}": k, f"lesion_sensitivity_{key}": _ratio(k, m)})
        out["size_bins"].append({"bin": name, "key": key, "lesions": m, "found": k, "sensitivity": _ratio(k, m)})
    return out
