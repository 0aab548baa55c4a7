"""Lesion coverage of a Glance-gated sliding window: the pure maths of gate calibration (numpy and cc3d only).

A tile is selected when its score > threshold (`gating.select_tiles`). Tile boxes are (T, 3, 2) int arrays,
half-open [start, stop) per axis, in the padded volume the predictor tiles. A lesion is a 26-connected
component of the ground truth; at threshold t it is *covered* when at least `min_covered_fraction` (0.9) of
its voxels lie in the union of the selected tiles (of their central regions when tile_margin > 0).

Per case only a few sorted arrays are kept (`CaseCoverage`): for each lesion voxel the maximum score of the
tiles covering it (a voxel is covered at t iff that score > t), and for each lesion its *coverage score*, the
value at rank ceil(0.9 n) of its n voxels' scores sorted descending (the lesion is covered iff t < it). Every
column of the operating curve is then a searchsorted over sorted arrays.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import cc3d
import numpy as np

from nnunetv2_gfscreen.core.lesions import CONNECTIVITY

MIN_COVERED_FRACTION = 0.9
# a tile's central region, the Glance's training label: the middle half of each side (a quarter trimmed
# at inner faces); at tile step 0.5 these regions cover the volume about once
CENTRAL_MARGIN = 0.25
COLUMNS = ("selection_ratio", "voxel_coverage", "lesion_sensitivity", "tile_sensitivity", "tile_specificity")


@dataclass
class CaseCoverage:
    """What calibration keeps of one case."""
    tile_scores: np.ndarray    # (T,) float64 Glance scores
    tile_labels: np.ndarray    # (T,) bool: the (whole) tile holds a lesion voxel
    voxel_scores: np.ndarray   # (U,) float64 ascending: distinct covering max scores of the lesion voxels (-inf: none)
    voxel_counts: np.ndarray   # (U,) int64: lesion voxels with that score
    lesion_scores: np.ndarray  # (L,) float64: lesion l is covered at threshold t iff t < lesion_scores[l]
    lesion_sizes: np.ndarray   # (L,) int64 voxels per lesion

    @property
    def n_lesions(self) -> int:
        return len(self.lesion_scores)

    def at(self, threshold: float) -> dict:
        """This case's operating point at `threshold` (coverage figures None without lesions)."""
        t = np.float64(threshold)
        n_vox, n_les = int(self.voxel_counts.sum()), self.n_lesions
        covered_vox = int(self.voxel_counts[self.voxel_scores > t].sum())
        covered = int((self.lesion_scores > t).sum())
        n_sel = int((self.tile_scores > t).sum())
        return {"tiles": len(self.tile_scores), "tiles_selected": n_sel,
                "selection_ratio": n_sel / len(self.tile_scores) if len(self.tile_scores) else None,
                "lesion_voxels": n_vox, "lesion_voxels_covered": covered_vox,
                "voxel_coverage": covered_vox / n_vox if n_vox else None,
                "lesions": n_les, "lesions_covered": covered, "lesion_coverage": covered / n_les if n_les else None}


def central_boxes(boxes: np.ndarray, image_shape: Sequence[int], tile_margin: float) -> np.ndarray:
    """Boxes (T, 3, 2) shrunk by floor(tile_margin * side) voxels at each face, except at faces on the image
    border (no tile reaches further out, so nothing could cover those voxels better)."""
    if not 0 <= tile_margin < 0.5:
        raise ValueError(f"tile_margin must be in [0, 0.5), got {tile_margin}")
    boxes = np.array(boxes, dtype=np.int64)
    margin = np.floor(tile_margin * (boxes[:, :, 1] - boxes[:, :, 0]) + 1e-9).astype(np.int64)
    boxes[:, :, 0] += np.where(boxes[:, :, 0] > 0, margin, 0)
    boxes[:, :, 1] -= np.where(boxes[:, :, 1] < np.asarray(image_shape), margin, 0)
    return boxes


def max_score_map(boxes: np.ndarray, scores: np.ndarray, region: np.ndarray) -> np.ndarray:
    """For each voxel of `region` ((3, 2) half-open box), the max score of the boxes (T, 3, 2) covering it.

    Returns float64 of the region's shape; -inf where no box covers the voxel."""
    region = np.asarray(region, dtype=np.int64)
    out = np.full(tuple(region[:, 1] - region[:, 0]), -np.inf, np.float64)
    lo = np.maximum(boxes[:, :, 0], region[:, 0]) - region[:, 0]
    hi = np.minimum(boxes[:, :, 1], region[:, 1]) - region[:, 0]
    for i in np.flatnonzero(np.all(hi > lo, axis=1)):
        view = out[tuple(slice(a, b) for a, b in zip(lo[i], hi[i]))]
        np.maximum(view, scores[i], out=view)
    return out


def coverage_rank(sizes: np.ndarray, fraction: float = MIN_COVERED_FRACTION) -> np.ndarray:
    """ceil(fraction * n) for each lesion size n (at least 1): the covered voxels a lesion needs."""
    return np.maximum(np.ceil(np.round(fraction * np.asarray(sizes, np.float64), 9)).astype(np.int64), 1)


def case_coverage(lesion: np.ndarray, boxes: np.ndarray, scores: np.ndarray, tile_margin: float = 0.0,
                  min_covered_fraction: float = MIN_COVERED_FRACTION) -> CaseCoverage:
    """Coverage summary of one case. lesion: (z, y, x) bool ground truth in the tiled (padded) frame;
    boxes: (T, 3, 2) tiles; scores: (T,) Glance scores. Only the lesions' bounding box is mapped."""
    lesion = np.asarray(lesion, dtype=bool)
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 3, 2)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if lesion.ndim != 3 or len(boxes) != len(scores):
        raise ValueError(f"need a 3D lesion mask and one score per box, got {lesion.shape}, {len(boxes)} boxes "
                         f"and {len(scores)} scores")
    if np.any(boxes[:, :, 0] < 0) or np.any(boxes[:, :, 1] > np.asarray(lesion.shape)):
        raise ValueError(f"tile boxes reach outside the volume {lesion.shape}")
    if not 0 < min_covered_fraction <= 1:
        raise ValueError(f"min_covered_fraction must be in (0, 1], got {min_covered_fraction}")
    empty_f, empty_i = np.zeros(0, np.float64), np.zeros(0, np.int64)
    if not lesion.any():
        return CaseCoverage(scores, np.zeros(len(scores), bool), empty_f, empty_i, empty_f, empty_i)
    region = np.array([[idx[0], idx[-1] + 1] for idx in
                       (np.flatnonzero(lesion.any(axis=tuple(a for a in range(3) if a != d))) for d in range(3))])
    crop = lesion[tuple(slice(a, b) for a, b in region)]
    lo = np.maximum(boxes[:, :, 0], region[:, 0]) - region[:, 0]
    hi = np.minimum(boxes[:, :, 1], region[:, 1]) - region[:, 0]
    labels = np.array([bool(np.all(h > l) and crop[tuple(slice(a, b) for a, b in zip(l, h))].any())
                       for l, h in zip(lo, hi)], dtype=bool)
    values = max_score_map(central_boxes(boxes, lesion.shape, tile_margin), scores, region)[crop]
    components = cc3d.connected_components(crop, connectivity=CONNECTIVITY)[crop].astype(np.int64)
    voxel_scores, voxel_counts = np.unique(values, return_counts=True)
    order = np.lexsort((-values, components))  # by lesion, then by score descending
    sizes = np.bincount(components)[1:]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    lesion_scores = values[order][starts + coverage_rank(sizes, min_covered_fraction) - 1]
    return CaseCoverage(scores, labels, voxel_scores.astype(np.float64), voxel_counts.astype(np.int64),
                        lesion_scores.astype(np.float64), sizes.astype(np.int64))


# ---------------------------------------------------------------------- operating curve
def candidate_thresholds(scores: np.ndarray) -> np.ndarray:
    """(K,) float64 ascending: below the lowest score (every tile selected), the midpoints between consecutive
    distinct scores, and the highest score (nothing selected). Every curve value changes only at a score."""
    distinct = np.unique(np.asarray(scores, dtype=np.float64))
    if not len(distinct):
        raise ValueError("no tile scores")
    mids = (distinct[:-1] + distinct[1:]) / 2
    mids = np.where(mids < distinct[1:], mids, distinct[:-1])  # rounding must not swallow the upper score
    low = np.nextafter(distinct[0], np.float64(-np.inf)) if distinct[0] <= 0 else np.float64(distinct[0] / 2)
    return np.concatenate([[low], mids, [distinct[-1]]]).astype(np.float64)


def _above(sorted_values: np.ndarray, thresholds: np.ndarray, weights: Optional[np.ndarray] = None) -> np.ndarray:
    """Count (or total weight) of sorted_values > each threshold."""
    idx = np.searchsorted(sorted_values, thresholds, side="right")
    if weights is None:
        return len(sorted_values) - idx
    cum = np.concatenate([[0], np.cumsum(weights)])
    return cum[-1] - cum[idx]


def operating_curve(cases: Sequence[CaseCoverage], thresholds: Optional[np.ndarray] = None) -> Dict[str, list]:
    """Pooled operating curve of `cases`: 'threshold' (ascending, default `candidate_thresholds` of all tile
    scores) and the COLUMNS at each threshold as JSON-ready lists (None where undefined: no lesion, no
    positive or no negative tile). Every column is non-increasing in the threshold except tile_specificity."""
    if not len(cases):
        raise ValueError("an operating curve needs at least one case")
    scores = np.concatenate([c.tile_scores for c in cases])
    t = candidate_thresholds(scores) if thresholds is None else np.asarray(thresholds, np.float64)
    labels = np.concatenate([c.tile_labels for c in cases])
    vox = np.concatenate([c.voxel_scores for c in cases])
    counts = np.concatenate([c.voxel_counts for c in cases])
    order = np.argsort(vox, kind="stable")
    lesions = np.sort(np.concatenate([c.lesion_scores for c in cases]))
    n, n_pos, n_vox = len(scores), int(labels.sum()), int(counts.sum())

    def ratio(num, den):
        return [float(v) / den for v in num] if den else [None] * len(t)
    return {
        "threshold": [float(v) for v in t],
        "selection_ratio": ratio(_above(np.sort(scores), t), n),
        "voxel_coverage": ratio(_above(vox[order], t, counts[order]), n_vox),
        "lesion_sensitivity": ratio(_above(lesions, t), len(lesions)),
        "tile_sensitivity": ratio(_above(np.sort(scores[labels]), t), n_pos),
        "tile_specificity": [None if v is None else 1 - v for v in ratio(_above(np.sort(scores[~labels]), t), n - n_pos)],
    }


def _column(curve: dict, name: str) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in curve[name]], dtype=np.float64)


def curve_at(curve: dict, threshold: float) -> dict:
    """The curve's row at the largest curve threshold <= `threshold`: exact at the curve's own thresholds (for
    any other threshold, `operating_curve(cases, [threshold])` is exact)."""
    t = np.asarray(curve["threshold"], np.float64)
    i = max(int(np.searchsorted(t, np.float64(threshold), side="right")) - 1, 0)
    return {k: curve[k][i] for k in ("threshold",) + COLUMNS if k in curve}


def threshold_for_target(curve: dict, target: float, column: str = "lesion_sensitivity") -> float:
    """The highest curve threshold whose `column` is >= target; the lowest one (every tile selected) when no
    threshold reaches it. ValueError when the column is undefined (no lesions)."""
    if not 0 < target <= 1:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    values = _column(curve, column)
    if not len(values) or np.all(np.isnan(values)):
        raise ValueError(f"the calibration curve has no {column} (no lesions in the calibration cases)")
    ok = np.flatnonzero(values >= target - 1e-12)
    return float(curve["threshold"][ok[-1] if len(ok) else 0])


def threshold_for_max_selection(curve: dict, max_selection: float) -> float:
    """The lowest curve threshold whose selection ratio is <= max_selection (the most sensitive within it)."""
    if not 0 <= max_selection <= 1:
        raise ValueError(f"max_selection must be in [0, 1], got {max_selection}")
    ok = np.flatnonzero(_column(curve, "selection_ratio") <= max_selection + 1e-12)
    return float(curve["threshold"][ok[0] if len(ok) else -1])


def choose_threshold(curve: dict, target: Optional[float] = None,
                     max_selection: Optional[float] = None) -> Tuple[float, str]:
    """Threshold for a lesion-level sensitivity target and/or a selection budget, and which one bound:
    the target's threshold, raised if needed until the selection ratio is <= max_selection."""
    if target is None and max_selection is None:
        raise ValueError("give a target sensitivity, a maximum selection ratio or both")
    t_target = None if target is None else threshold_for_target(curve, target)
    t_budget = None if max_selection is None else threshold_for_max_selection(curve, max_selection)
    if t_budget is None or (t_target is not None and t_target >= t_budget):
        reached = _column(curve, "lesion_sensitivity")[curve["threshold"].index(t_target)] >= target - 1e-12
        return t_target, "lesion-level sensitivity target" + ("" if reached else " (not reached: every tile)")
    return t_budget, "selection budget"


def thin_curve(curve: dict, keep: Sequence[float] = (), max_points: int = 2000) -> dict:
    """At most ~max_points rows of `curve`, evenly spaced, plus: the first and last row, the rows of the `keep`
    thresholds, and the highest threshold of every lesion-sensitivity level (so target picks stay exact)."""
    n = len(curve["threshold"])
    if n <= max_points:
        return curve
    idx = set(np.linspace(0, n - 1, max_points).round().astype(int).tolist())
    sens = np.nan_to_num(_column(curve, "lesion_sensitivity"), nan=-1.0)
    idx.update(np.flatnonzero(sens[:-1] != sens[1:]).tolist())
    t = np.asarray(curve["threshold"], np.float64)
    idx.update(int(np.searchsorted(t, np.float64(k))) for k in keep)
    rows = sorted(i for i in idx if 0 <= i < n)
    return {k: [v[i] for i in rows] for k, v in curve.items()}


# ---------------------------------------------------------------------- leave one case out
def logit(p) -> np.ndarray:
    """log(p / (1 - p)) in float64; p = 1 gives +inf and p = 0 gives -inf (no warnings)."""
    p = np.asarray(p, np.float64)
    with np.errstate(divide="ignore"):
        return np.log(p) - np.log1p(-p)


def loco_margin(cases: Sequence[CaseCoverage], loco: dict, target: float) -> Optional[float]:
    """The smallest margin m >= 0 in logit units such that lowering each case's leave-one-case-out threshold
    by m covers at least `target` of all the lesions (pooled). None when no case with lesions has a
    leave-one-case-out threshold fitted on other lesions.

    Why: the highest threshold that reaches the target on a few calibration lesions sits right at the
    weakest one's score, and a confident Glance spreads lesion scores over tens of logits, so a new
    lesion is easily missed (learning check: 4 validation cases, 5 lesions, 1 of them missed under
    leave-one-case-out). The margin that would have rescued the held-out lesions is an estimate, made
    on the calibration cases themselves, of how far below its in-sample value the threshold must go.
    """
    gaps = []
    for case, row in zip(cases, loco["cases"]):
        if case.n_lesions and not row["fallback"]:
            # lesion l is covered at t iff t < its score: missed by logit(t) - logit(score) when positive
            gaps.append(logit(row["threshold"]) - logit(case.lesion_scores))
    if not gaps:
        return None
    gaps = np.sort(np.concatenate(gaps))
    need = gaps[int(coverage_rank(np.array([len(gaps)]), target)[0]) - 1]
    # strictly more than needed (covered iff threshold < score); 1e-6 logits survive the round trip through exp
    return 0.0 if need < 0 else float(need + 1e-6)


def lower_by_logit(threshold: float, margin: float) -> float:
    """sigmoid(logit(threshold) - margin): the threshold lowered by `margin` in logit units."""
    if margin == 0:
        return float(threshold)
    return float(1.0 / (1.0 + np.exp(-(logit(threshold) - margin))))


def leave_one_case_out(cases: Sequence[CaseCoverage], target: float, fallback_threshold: float,
                       case_ids: Optional[Sequence[str]] = None) -> dict:
    """For each case, the threshold fitted (same rule and target) on all *other* cases and this case's
    operating point at it, plus the pooled figures. A case whose other cases hold no lesion (e.g. the only
    case) gets `fallback_threshold` and 'fallback': True. JSON-ready."""
    case_ids = [f"case_{i}" for i in range(len(cases))] if case_ids is None else list(case_ids)
    if len(case_ids) != len(cases):
        raise ValueError(f"{len(case_ids)} case ids for {len(cases)} cases")
    total_lesions = sum(c.n_lesions for c in cases)
    rows: List[dict] = []
    for i, case in enumerate(cases):
        others = [c for j, c in enumerate(cases) if j != i]
        fallback = total_lesions - case.n_lesions == 0
        t = fallback_threshold if fallback else threshold_for_target(operating_curve(others), target)
        rows.append({"case": str(case_ids[i]), "threshold": float(t), "fallback": fallback, **case.at(t)})
    tiles, sel = sum(r["tiles"] for r in rows), sum(r["tiles_selected"] for r in rows)
    n_vox, n_les = sum(r["lesion_voxels"] for r in rows), sum(r["lesions"] for r in rows)
    cov_vox = sum(r["lesion_voxels_covered"] for r in rows)
    covered = sum(r["lesions_covered"] for r in rows)
    return {"target_lesion_sensitivity": float(target), "cases": rows,
            "n_fallback": sum(r["fallback"] for r in rows),
            "selection_ratio": sel / tiles if tiles else None,
            "voxel_coverage": cov_vox / n_vox if n_vox else None,
            "lesion_sensitivity": covered / n_les if n_les else None,
            "lesions": n_les, "lesions_covered": covered}
