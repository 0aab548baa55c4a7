"""How good was the gate on test cases: tile AUC, lesion coverage, and a random gate at the same budget.

Reads the predictor's per-case reports (tile boxes in the original image, Glance scores, the tiles
selected) and the ground truth. Coverage is the calibration's (`coverage.py`): a lesion (26-connected)
is covered when at least 90% of its voxels lie in the union of selected tiles. With tile step 0.5
every voxel lies in up to 8 tiles, so even a random gate covers many lesions: the random gate at the
same selection ratio, per case, is the baseline to beat (`random_gate_coverage`).
"""
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy.stats import rankdata

from nnunetv2_gfscreen.core.case_report import CaseReport
from nnunetv2_gfscreen.core.coverage import (CENTRAL_MARGIN, CaseCoverage, case_coverage, central_boxes, operating_curve,
                                        threshold_for_target)


def tile_auc(scores: np.ndarray, positive: np.ndarray) -> Optional[float]:
    """Mann-Whitney AUC of `scores` for `positive` (average ranks for ties); None without both classes."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def report_boxes(report: dict) -> np.ndarray:
    """(T, 3, 2) half-open tile boxes (original image array order) of a case report."""
    return np.array([t["bbox_original"] for t in report["tiles"]], dtype=np.int64).reshape(-1, 3, 2)


def central_labels(lesion: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(T,) bool: the tile's central region (a quarter of each side trimmed, untrimmed at the image border)
    holds a lesion voxel: the Glance's training label (trainers/group_sampling.py)."""
    inner = central_boxes(boxes, lesion.shape, CENTRAL_MARGIN)
    return np.array([bool(lesion[tuple(slice(a, b) for a, b in box)].any()) for box in inner], dtype=bool)


def random_gate_coverage(lesion: np.ndarray, boxes: np.ndarray, n_selected: int, repeats: int = 100,
                         seed: int = 0) -> Dict[str, float]:
    """Mean voxel and lesion coverage of a gate that selects `n_selected` of the tiles uniformly at random."""
    rng = np.random.default_rng(seed)
    voxel, lesions = [], []
    for _ in range(repeats):
        scores = np.zeros(len(boxes), np.float64)
        scores[rng.choice(len(boxes), size=min(n_selected, len(boxes)), replace=False)] = 1.0
        at = case_coverage(lesion, boxes, scores).at(0.5)
        voxel.append(at["voxel_coverage"])
        lesions.append(at["lesions_covered"])
    return {"voxel_coverage": float(np.mean(voxel)), "lesions_covered": float(np.mean(lesions))}


def gate_figures(reports: Sequence[CaseReport], labels: Sequence[np.ndarray], target: float = 0.98,
                 random_repeats: int = 100) -> dict:
    """Pooled gate figures of test cases (reports and their ground-truth masks, original image arrays).

    - tile_auc: Glance scores vs "the tile holds a lesion voxel" (slivers at a tile's edge count);
      tile_auc_central: vs "the tile's central region holds a lesion voxel" (the Glance's training label);
    - at the applied thresholds (each report's `selected`): selection_ratio, voxel_coverage, lesion_coverage;
    - random_*: a random gate selecting as many tiles per case (mean over `random_repeats` draws);
    - oracle_selection_for_target: the selection ratio the Glance's scores would need on *these* cases for
      lesion coverage `target` (threshold picked on the test cases themselves: a bound, not a result).
    """
    if len(reports) != len(labels) or not reports:
        raise ValueError(f"need one label per report and at least one case, got {len(reports)} and {len(labels)}")
    scores, positive, central, cases, applied, randoms = [], [], [], [], [], []
    for report, gt in zip(reports, labels):
        gt = np.asarray(gt) > 0
        boxes = report_boxes(report)
        s = np.array([t["score"] for t in report["tiles"]], np.float64)
        selected = np.array([t["selected"] for t in report["tiles"]], bool)
        cov: CaseCoverage = case_coverage(gt, boxes, s)
        cases.append(cov)
        scores.append(s)
        positive.append(cov.tile_labels)
        central.append(central_labels(gt, boxes))
        # the applied gate as scores: 1 for selected tiles, 0 otherwise, read at 0.5
        applied.append(case_coverage(gt, boxes, selected.astype(np.float64)).at(0.5))
        randoms.append(random_gate_coverage(gt, boxes, int(selected.sum()), random_repeats) if gt.any()
                       else {"voxel_coverage": None, "lesions_covered": 0.0})
    n_tiles = sum(a["tiles"] for a in applied)
    n_vox = sum(a["lesion_voxels"] for a in applied)
    n_les = sum(a["lesions"] for a in applied)
    curve = operating_curve(cases)
    oracle = None
    if n_les:
        t = threshold_for_target(curve, target)
        oracle = curve["selection_ratio"][curve["threshold"].index(t)]
    vox_weighted = lambda key: sum((r[key] or 0.0) * a["lesion_voxels"] for r, a in zip(randoms, applied)) / n_vox
    return {
        "cases": len(reports), "tiles": n_tiles, "lesions": n_les,
        "tile_auc": tile_auc(np.concatenate(scores), np.concatenate(positive)),
        "tile_auc_central": tile_auc(np.concatenate(scores), np.concatenate(central)),
        "selection_ratio": sum(a["tiles_selected"] for a in applied) / n_tiles if n_tiles else None,
        "voxel_coverage": sum(a["lesion_voxels_covered"] for a in applied) / n_vox if n_vox else None,
        "lesion_coverage": sum(a["lesions_covered"] for a in applied) / n_les if n_les else None,
        "random_voxel_coverage": vox_weighted("voxel_coverage") if n_vox else None,
        "random_lesion_coverage": sum(r["lesions_covered"] for r in randoms) / n_les if n_les else None,
        "oracle_target": target, "oracle_selection_for_target": oracle,
    }


def gate_figures_from_folders(report_dir: Path, labels_dir: Path, file_ending: str = ".nii.gz",
                              **kwargs) -> dict:
    """`gate_figures` for every report in `report_dir` with its ground truth `<labels_dir>/<case><file_ending>`."""
    import SimpleITK as sitk
    from nnunetv2_gfscreen.evaluation.reports import load_report

    reports: List[CaseReport] = []
    labels: List[np.ndarray] = []
    for path in sorted(Path(report_dir).glob("*.json")):
        report = load_report(str(path))
        if "tiles" not in report:
            continue
        reports.append(report)
        labels.append(sitk.GetArrayFromImage(sitk.ReadImage(str(Path(labels_dir) / f"{report['case']}{file_ending}"))))
    if not reports:
        raise FileNotFoundError(f"no case report with tiles in {report_dir}")
    return gate_figures(reports, labels, **kwargs)
