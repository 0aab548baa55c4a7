"""Lesion coverage of a Glance-gated sliding window: the pure maths of gate calibration (numpy and cc3d only).

A tile is selected when its score (Glance logit) > threshold, or when the gate's floor selects it whatever its
score (core/gate.py; `floor` below: such tiles count as selected at every threshold). Tile boxes are (T, 3, 2) int arrays,
half-open [start, stop) per axis, in the padded volume the predictor tiles. A lesion is a 26-connected
component of the ground truth; at threshold t it is *covered* when at least `min_covered_fraction` (0.9) of
its voxels lie in the union of the selected tiles (of their central regions when tile_margin > 0).

Per case only a few sorted arrays are kept (`CaseCoverage`): for each lesion voxel the maximum score of the
tiles covering it (a voxel is covered at t iff that score > t), and for each lesion its *coverage score*, the
value at rank ceil(0.9 n) of its n voxels' scores sorted descending (the lesion is covered iff t < it). Every
column of the operating curve is then a searchsorted over sorted arrays.
"""
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import cc3d
import numpy as np

from nnunetv2_gfscreen.core.gate import baseline_logit
from nnunetv2_gfscreen.core.lesions import CONNECTIVITY, SIZE_BIN_KEYS, size_bin

MIN_COVERED_FRACTION = 0.9
# a tile's central region, the Glance's training label: the middle half of each side (a quarter trimmed
# at inner faces); at tile step 0.5 these regions cover the volume about once
CENTRAL_MARGIN = 0.25
COLUMNS = ("selection_ratio", "voxel_coverage", "lesion_sensitivity", "tile_sensitivity", "tile_specificity")


@dataclass
class CaseCoverage:
    """What calibration keeps of one case."""
    tile_scores: np.ndarray    # (T,) float64 Glance logits
    tile_labels: np.ndarray    # (T,) bool: the (whole) tile holds a lesion voxel
    voxel_scores: np.ndarray   # (U,) float64 ascending: distinct covering max scores of the lesion voxels (-inf: none)
    voxel_counts: np.ndarray   # (U,) int64: lesion voxels with that score
    lesion_scores: np.ndarray  # (L,) float64: lesion l is covered at threshold t iff t < lesion_scores[l]
    lesion_sizes: np.ndarray   # (L,) int64 voxels per lesion
    lesion_volumes: Optional[np.ndarray] = None  # (L,) float64 mm^3 (voxels x voxel volume)
    floor: Optional[np.ndarray] = None           # (T,) bool: tiles the gate's floor selects at any threshold
    case_id: Optional[str] = None

    def __post_init__(self):
        if self.lesion_volumes is None:
            self.lesion_volumes = self.lesion_sizes.astype(np.float64)
        if self.floor is None:
            self.floor = np.zeros(len(self.tile_scores), bool)

    @property
    def n_lesions(self) -> int:
        return len(self.lesion_scores)

    @property
    def selection_scores(self) -> np.ndarray:
        """(T,) scores that decide selection: +inf for the floor's tiles."""
        return np.where(self.floor, np.inf, self.tile_scores)

    @property
    def statistic(self) -> float:
        """The case's baseline logit (the gate's out-of-distribution statistic, `gate.baseline_logit`)."""
        return baseline_logit(self.tile_scores)

    def at(self, threshold: float) -> dict:
        """This case's operating point at `threshold` (coverage figures None without lesions)."""
        t = np.float64(threshold)
        n_vox, n_les = int(self.voxel_counts.sum()), self.n_lesions
        covered_vox = int(self.voxel_counts[self.voxel_scores > t].sum())
        covered = int((self.lesion_scores > t).sum())
        n_sel = int((self.selection_scores > t).sum())
        return {"tiles": len(self.tile_scores), "tiles_selected": n_sel,
                "selection_ratio": n_sel / len(self.tile_scores) if len(self.tile_scores) else None,
                "lesion_voxels": n_vox, "lesion_voxels_covered": covered_vox,
                "voxel_coverage": covered_vox / n_vox if n_vox else None,
                "lesions": n_les, "lesions_covered": covered, "lesion_coverage": covered / n_les if n_les else None}

    def to_dict(self) -> dict:
        """What a calibration record keeps of the case to refit the rule (no voxel-level arrays)."""
        return {"case": self.case_id, "tile_scores": self.tile_scores.tolist(),
                "tile_labels": self.tile_labels.astype(int).tolist(), "floor": self.floor.astype(int).tolist(),
                "lesion_scores": self.lesion_scores.tolist(), "lesion_sizes": self.lesion_sizes.tolist(),
                "lesion_volumes": self.lesion_volumes.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "CaseCoverage":
        return cls(np.asarray(d["tile_scores"], np.float64), np.asarray(d["tile_labels"], bool),
                   np.zeros(0, np.float64), np.zeros(0, np.int64), np.asarray(d["lesion_scores"], np.float64),
                   np.asarray(d["lesion_sizes"], np.int64), np.asarray(d["lesion_volumes"], np.float64),
                   np.asarray(d["floor"], bool), d.get("case"))


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
                  min_covered_fraction: float = MIN_COVERED_FRACTION, floor: Optional[np.ndarray] = None,
                  voxel_volume: float = 1.0, case_id: Optional[str] = None) -> CaseCoverage:
    """Coverage summary of one case. lesion: (z, y, x) bool ground truth in the tiled (padded) frame;
    boxes: (T, 3, 2) tiles; scores: (T,) Glance logits; floor: (T,) bool tiles selected at any threshold;
    voxel_volume: mm^3 per voxel (for the lesion volumes). Only the lesions' bounding box is mapped."""
    lesion = np.asarray(lesion, dtype=bool)
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 3, 2)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    floor = np.zeros(len(scores), bool) if floor is None else np.asarray(floor, bool).reshape(-1)
    if lesion.ndim != 3 or len(boxes) != len(scores) or len(floor) != len(scores):
        raise ValueError(f"need a 3D lesion mask and one score and floor flag per box, got {lesion.shape}, "
                         f"{len(boxes)} boxes, {len(scores)} scores and {len(floor)} floor flags")
    if np.any(boxes[:, :, 0] < 0) or np.any(boxes[:, :, 1] > np.asarray(lesion.shape)):
        raise ValueError(f"tile boxes reach outside the volume {lesion.shape}")
    if not 0 < min_covered_fraction <= 1:
        raise ValueError(f"min_covered_fraction must be in (0, 1], got {min_covered_fraction}")
    empty_f, empty_i = np.zeros(0, np.float64), np.zeros(0, np.int64)
    if not lesion.any():
        return CaseCoverage(scores, np.zeros(len(scores), bool), empty_f, empty_i, empty_f, empty_i, empty_f,
                            floor, case_id)
    region = np.array([[idx[0], idx[-1] + 1] for idx in
                       (np.flatnonzero(lesion.any(axis=tuple(a for a in range(3) if a != d))) for d in range(3))])
    crop = lesion[tuple(slice(a, b) for a, b in region)]
    lo = np.maximum(boxes[:, :, 0], region[:, 0]) - region[:, 0]
    hi = np.minimum(boxes[:, :, 1], region[:, 1]) - region[:, 0]
    labels = np.array([bool(np.all(h > l) and crop[tuple(slice(a, b) for a, b in zip(l, h))].any())
                       for l, h in zip(lo, hi)], dtype=bool)
    values = max_score_map(central_boxes(boxes, lesion.shape, tile_margin), np.where(floor, np.inf, scores),
                           region)[crop]
    components = cc3d.connected_components(crop, connectivity=CONNECTIVITY)[crop].astype(np.int64)
    voxel_scores, voxel_counts = np.unique(values, return_counts=True)
    order = np.lexsort((-values, components))  # by lesion, then by score descending
    sizes = np.bincount(components)[1:]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    lesion_scores = values[order][starts + coverage_rank(sizes, min_covered_fraction) - 1]
    return CaseCoverage(scores, labels, voxel_scores.astype(np.float64), voxel_counts.astype(np.int64),
                        lesion_scores.astype(np.float64), sizes.astype(np.int64),
                        sizes.astype(np.float64) * float(voxel_volume), floor, case_id)


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
    positive or no negative tile), plus 'case_miss_rate' (the mean over cases with lesions of the share of
    their lesions missed: the risk that conformal risk control bounds) and the lesion-level sensitivity per
    size bin ('lesion_sensitivity_<key>' for the keys of core.lesions.SIZE_BIN_KEYS). Every column is
    non-increasing in the threshold except tile_specificity and case_miss_rate."""
    if not len(cases):
        raise ValueError("an operating curve needs at least one case")
    scores = np.concatenate([c.tile_scores for c in cases])
    t = candidate_thresholds(scores) if thresholds is None else np.asarray(thresholds, np.float64)
    selection = np.sort(np.concatenate([c.selection_scores for c in cases]))
    labels = np.concatenate([c.tile_labels for c in cases])
    vox = np.concatenate([c.voxel_scores for c in cases])
    counts = np.concatenate([c.voxel_counts for c in cases])
    order = np.argsort(vox, kind="stable")
    lesion_scores = np.concatenate([c.lesion_scores for c in cases])
    lesions = np.sort(lesion_scores)
    bins = size_bin(np.concatenate([c.lesion_volumes for c in cases]))
    n, n_pos, n_vox = len(scores), int(labels.sum()), int(counts.sum())

    def ratio(num, den):
        return [float(v) / den for v in num] if den else [None] * len(t)
    return {
        "threshold": [float(v) for v in t],
        "selection_ratio": ratio(_above(selection, t), n),
        "voxel_coverage": ratio(_above(vox[order], t, counts[order]), n_vox),
        "lesion_sensitivity": ratio(_above(lesions, t), len(lesions)),
        "tile_sensitivity": ratio(_above(np.sort(scores[labels]), t), n_pos),
        "tile_specificity": [None if v is None else 1 - v for v in ratio(_above(np.sort(scores[~labels]), t), n - n_pos)],
        "case_miss_rate": case_miss_rate(cases, t),
        **{f"lesion_sensitivity_{key}": ratio(_above(np.sort(lesion_scores[bins == b]), t), int((bins == b).sum()))
           for b, key in enumerate(SIZE_BIN_KEYS)},
    }


def case_miss_rate(cases: Sequence[CaseCoverage], thresholds: np.ndarray) -> list:
    """At each threshold, the mean over cases with lesions of the share of their lesions missed (a lesion is
    missed at t iff its coverage score <= t); None without such cases."""
    with_lesions = [c for c in cases if c.n_lesions]
    t = np.asarray(thresholds, np.float64)
    if not with_lesions:
        return [None] * len(t)
    missed = sum(np.searchsorted(np.sort(c.lesion_scores), t, side="right") / c.n_lesions for c in with_lesions)
    return [float(v) for v in missed / len(with_lesions)]


def _column(curve: dict, name: str) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in curve[name]], dtype=np.float64)


def curve_at(curve: dict, threshold: float) -> dict:
    """The curve's row at the largest curve threshold <= `threshold`: exact at the curve's own thresholds (for
    any other threshold, `operating_curve(cases, [threshold])` is exact)."""
    t = np.asarray(curve["threshold"], np.float64)
    i = max(int(np.searchsorted(t, np.float64(threshold), side="right")) - 1, 0)
    return {k: v[i] for k, v in curve.items()}


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
