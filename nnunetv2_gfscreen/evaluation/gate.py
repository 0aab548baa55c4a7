"""How good was the gate on test cases: tile AUC, lesion coverage (also per lesion size), and a random gate.

A `GateCase` is what the gate did on one case (tile boxes, Glance scores, the tiles the Focus predicted) with
its ground truth, in one voxel frame: the predictor's reports give boxes in the original image
(`cases_from_reports`), the trainer's final validation in preprocessed voxels. Coverage is the calibration's
(`coverage.py`): a lesion (26-connected) is covered when at least 90% of its voxels lie in the union of the
selected tiles' central regions (the middle half of each side, as the calibration counts: a lesion only at a
selected tile's edge is where the Focus, seeing it without context, misses it). With tile step 0.5 every voxel lies in up to 8 tiles, so even a random gate covers many
lesions: the random gate at the same number of tiles per case is the baseline to beat (`random_gate_coverage`).
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy.stats import rankdata

from nnunetv2_gfscreen.core.case_report import CaseReport
from nnunetv2_gfscreen.core.coverage import (CENTRAL_MARGIN, case_coverage, central_boxes, operating_curve,
                                             threshold_for_target)
from nnunetv2_gfscreen.core.lesions import SIZE_BIN_KEYS, SIZE_BINS, size_bin
from nnunetv2_gfscreen.plans.settings import GFScreenSettings


@dataclass
class GateCase:
    """One case as the gate saw it: boxes (T, 3, 2) half-open in the frame of `lesion` ((z, y, x) bool ground
    truth), scores (T,) Glance logits, selected (T,) bool: the tiles the Focus predicted."""
    boxes: np.ndarray
    scores: np.ndarray
    selected: np.ndarray
    lesion: np.ndarray
    voxel_volume: float = 1.0  # mm^3, for the size bins


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


def cases_from_reports(reports: Sequence[CaseReport], labels: Sequence[np.ndarray],
                       voxel_volumes: Optional[Sequence[float]] = None) -> List[GateCase]:
    """GateCases from the predictor's reports (boxes in the original image) and the ground truths."""
    if len(reports) != len(labels):
        raise ValueError(f"need one label per report, got {len(reports)} and {len(labels)}")
    volumes = voxel_volumes or [1.0] * len(reports)
    return [GateCase(report_boxes(r), np.array([t["score"] for t in r["tiles"]], np.float64),
                     np.array([t["selected"] for t in r["tiles"]], bool), np.asarray(gt) > 0, float(v))
            for r, gt, v in zip(reports, labels, volumes)]


def central_labels(lesion: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(T,) bool: the tile's central region (a quarter of each side trimmed, untrimmed at the image border)
    holds a lesion voxel: the Glance's training label (trainers/group_sampling.py)."""
    inner = central_boxes(boxes, lesion.shape, CENTRAL_MARGIN)
    return np.array([bool(lesion[tuple(slice(a, b) for a, b in box)].any()) for box in inner], dtype=bool)


def random_gate_coverage(lesion: np.ndarray, boxes: np.ndarray, n_selected: int, repeats: int = 100,
                         seed: int = 0, voxel_volume: float = 1.0) -> Dict[str, object]:
    """Mean voxel and lesion coverage (also per size bin) of a gate that selects `n_selected` of the tiles
    uniformly at random."""
    rng = np.random.default_rng(seed)
    voxel, lesions, per_bin = [], [], []
    for _ in range(repeats):
        scores = np.zeros(len(boxes), np.float64)
        scores[rng.choice(len(boxes), size=min(n_selected, len(boxes)), replace=False)] = 1.0
        cov = case_coverage(lesion, boxes, scores, tile_margin=CENTRAL_MARGIN, voxel_volume=voxel_volume)
        at = cov.at(0.5)
        voxel.append(at["voxel_coverage"])
        lesions.append(at["lesions_covered"])
        bins = size_bin(cov.lesion_volumes)
        per_bin.append([int((cov.lesion_scores[bins == b] > 0.5).sum()) for b in range(len(SIZE_BINS))])
    return {"voxel_coverage": None if voxel[0] is None else float(np.mean(voxel)),
            "lesions_covered": float(np.mean(lesions)), "lesions_covered_by_bin": np.mean(per_bin, 0).tolist()}


def gate_figures(cases: Sequence[GateCase], target: float = GFScreenSettings.target_lesion_sensitivity,
                 random_repeats: int = 100) -> dict:
    """Pooled gate figures of test cases.

    - tile_auc: Glance scores vs "the tile holds a lesion voxel" (slivers at a tile's edge count);
      tile_auc_central: vs "the tile's central region holds a lesion voxel" (the Glance's training label);
    - at the applied gate (each case's `selected`): selection_ratio, voxel_coverage, lesion_coverage, and per
      lesion-size bin (`size_bins`: lesions, covered, and what a random gate covers);
    - random_*: a random gate selecting as many tiles per case (mean over `random_repeats` draws);
    - oracle_selection_for_target: the selection ratio the Glance's scores would need on *these* cases for
      lesion coverage `target` (threshold picked on the test cases themselves: a bound, not a result).
    """
    if not cases:
        raise ValueError("need at least one case")
    scores, positive, central, coverages, applied, randoms, bins, covered = [], [], [], [], [], [], [], []
    for case in cases:
        cov = case_coverage(case.lesion, case.boxes, case.scores, tile_margin=CENTRAL_MARGIN,
                            voxel_volume=case.voxel_volume)
        coverages.append(cov)
        scores.append(case.scores)
        positive.append(cov.tile_labels)
        central.append(central_labels(case.lesion, case.boxes))
        # the applied gate as scores: 1 for selected tiles, 0 otherwise, read at 0.5
        gated = case_coverage(case.lesion, case.boxes, case.selected.astype(np.float64), tile_margin=CENTRAL_MARGIN,
                              voxel_volume=case.voxel_volume)
        applied.append(gated.at(0.5))
        bins.append(size_bin(gated.lesion_volumes))
        covered.append(gated.lesion_scores > 0.5)
        randoms.append(random_gate_coverage(case.lesion, case.boxes, int(case.selected.sum()), random_repeats,
                                            voxel_volume=case.voxel_volume) if case.lesion.any()
                       else {"voxel_coverage": None, "lesions_covered": 0.0,
                             "lesions_covered_by_bin": [0.0] * len(SIZE_BINS)})
    n_tiles = sum(a["tiles"] for a in applied)
    n_vox = sum(a["lesion_voxels"] for a in applied)
    n_les = sum(a["lesions"] for a in applied)
    oracle = None
    if n_les:
        curve = operating_curve(coverages)
        t = threshold_for_target(curve, target)
        oracle = curve["selection_ratio"][curve["threshold"].index(t)]
    bins, covered = np.concatenate(bins), np.concatenate(covered)
    size_bins = []
    for b, (name, key) in enumerate(zip(SIZE_BINS, SIZE_BIN_KEYS)):
        m = int((bins == b).sum())
        k = int(covered[bins == b].sum())
        rnd = sum(r["lesions_covered_by_bin"][b] for r in randoms)
        size_bins.append({"bin": name, "key": key, "lesions": m, "covered": k, "coverage": k / m if m else None,
                          "random_coverage": rnd / m if m else None})
    vox_weighted = lambda key: sum((r[key] or 0.0) * a["lesion_voxels"] for r, a in zip(randoms, applied)) / n_vox
    return {
        "cases": len(cases), "tiles": n_tiles, "lesions": n_les,
        "tile_auc": tile_auc(np.concatenate(scores), np.concatenate(positive)),
        "tile_auc_central": tile_auc(np.concatenate(scores), np.concatenate(central)),
        "tiles_selected": sum(a["tiles_selected"] for a in applied),
        "lesions_covered": sum(a["lesions_covered"] for a in applied),
        "selection_ratio": sum(a["tiles_selected"] for a in applied) / n_tiles if n_tiles else None,
        "voxel_coverage": sum(a["lesion_voxels_covered"] for a in applied) / n_vox if n_vox else None,
        "lesion_coverage": sum(a["lesions_covered"] for a in applied) / n_les if n_les else None,
        "random_voxel_coverage": vox_weighted("voxel_coverage") if n_vox else None,
        "random_lesion_coverage": sum(r["lesions_covered"] for r in randoms) / n_les if n_les else None,
        "size_bins": size_bins,
        "oracle_target": target, "oracle_selection_for_target": oracle,
    }


def decision_summary(reports: Sequence[CaseReport]) -> dict:
    """What the gate's case-level parts did over a set of reports (their `gate` blocks, `CaseReport`): how many
    cases fell back (outside the calibration envelope), and the tiles the floor, the fallback and border growth
    added beyond the threshold's. Reports without a gate block (dense, or another tool's) are not counted."""
    blocks = [r["gate"] for r in reports if isinstance(r.get("gate"), dict)]
    n = len(blocks)
    total = lambda key: int(sum(int(b.get(key) or 0) for b in blocks))  # noqa: E731
    fallback = sum(bool(b.get("fallback")) for b in blocks)
    return {"cases": n, "fallback_cases": fallback, "fallback_rate": fallback / n if n else None,
            "tiles_by_floor": total("tiles_by_floor"), "tiles_by_fallback": total("tiles_by_fallback"),
            "tiles_grown": total("tiles_grown"), "uncalibrated_cases": sum(not b.get("calibrated") for b in blocks)}


def gate_figures_from_folders(report_dir: Path, labels_dir: Path, file_ending: str = ".nii.gz",
                              **kwargs) -> dict:
    """`gate_figures` for every report in `report_dir` with its ground truth `<labels_dir>/<case><file_ending>`,
    and the reports' `decision_summary` under 'decisions'."""
    import SimpleITK as sitk
    from nnunetv2_gfscreen.core.case_report import load_report

    reports: List[CaseReport] = []
    labels: List[np.ndarray] = []
    volumes: List[float] = []
    for path in sorted(Path(report_dir).glob("*.json")):
        report = load_report(str(path))
        if not report.get("tiles") or any(t.get("score") is None for t in report["tiles"]):
            continue
        reports.append(report)
        image = sitk.ReadImage(str(Path(labels_dir) / f"{report['case']}{file_ending}"))
        labels.append(sitk.GetArrayFromImage(image))
        volumes.append(float(np.prod(image.GetSpacing())))
    if not reports:
        raise FileNotFoundError(f"no case report with scored tiles in {report_dir}")
    return {**gate_figures(cases_from_reports(reports, labels, volumes), **kwargs),
            "decisions": decision_summary(reports)}
