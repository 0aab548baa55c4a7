"""The numbers behind a case picture (evaluation/figures.py draws them): which slices to show (through the largest
lesion and through every lesion the prediction missed), the intensity window, the tiles' score and selection maps
per view, and the title line. Pure numpy, no matplotlib."""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from nnunetv2_gfscreen.core.coverage import MIN_COVERED_FRACTION
from nnunetv2_gfscreen.core.lesions import label_lesions

HU_SOFT_TISSUE_WINDOW = (-160.0, 240.0)
MAX_VIEW_ROWS = 6  # rows of three views in a picture: the largest lesion, then missed lesions


def _component_centre(labels: np.ndarray, component: int, spacing_zyx: Optional[Sequence[float]] = None
                      ) -> Tuple[int, int, int]:
    """The voxel of component `component` of `labels` nearest its centroid (so the three slices through it
    all cut the lesion, even a curved one)."""
    coords = np.argwhere(labels == component)
    sp = np.ones(3) if spacing_zyx is None else np.asarray(spacing_zyx, float)
    d2 = (((coords - coords.mean(0)) * sp) ** 2).sum(1)
    return tuple(int(v) for v in coords[int(np.argmin(d2))])


def largest_component_centre(mask: np.ndarray, spacing_zyx: Optional[Sequence[float]] = None
                             ) -> Optional[Tuple[int, int, int]]:
    """The voxel of the largest 26-connected component of ``mask`` nearest its centroid; None for an empty
    mask."""
    if mask is None:
        return None
    labels, n = label_lesions(mask)
    if n == 0:
        return None
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    counts[0] = 0
    return _component_centre(labels, int(np.argmax(counts)), spacing_zyx)


@dataclass(frozen=True)
class MissedLesion:
    """A ground-truth lesion that no predicted voxel touches, and which stage lost it: 'gate' (under
    MIN_COVERED_FRACTION of its voxels in the selected tiles, so the Focus never saw it), 'Focus' (its tiles were
    predicted) or 'prediction' (no tiles known)."""
    component: int                     # its id in the ground truth's component labels
    centre_zyx: Tuple[int, int, int]
    voxels: int
    volume_mm3: float
    missed_by: str

    def describe(self) -> str:
        voxels = f"{self.voxels} voxel" + ("" if self.voxels == 1 else "s")
        return f"missed by the {self.missed_by}: lesion of {voxels} ({self.volume_mm3:.0f} mm3)"


def missed_lesions(gt: Optional[np.ndarray], pred: Optional[np.ndarray], boxes: Optional[np.ndarray] = None,
                   selected: Optional[np.ndarray] = None, spacing_zyx: Optional[Sequence[float]] = None
                   ) -> Tuple[Optional[np.ndarray], List[MissedLesion]]:
    """(ground-truth component labels, the lesions the prediction missed, largest first).

    gt, pred: (z, y, x) masks (nothing is missed without both); boxes (n, 3, 2) half-open tile boxes and
    selected (n,) bool, the report's tiles: a missed lesion is the gate's when its voxels lie less than
    MIN_COVERED_FRACTION in the selected tiles, else the Focus's; without tiles, the prediction's."""
    if gt is None or pred is None:
        return None, []
    labels, n = label_lesions(gt)
    if n == 0:
        return labels, []
    found = np.zeros(n + 1, bool)
    found[np.unique(labels[np.asarray(pred) > 0])] = True
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    union = None
    if boxes is not None and len(boxes):
        union = np.zeros(labels.shape, bool)
        for box, sel in zip(boxes, selected):
            if sel:
                union[tuple(slice(int(a), int(b)) for a, b in box)] = True
        in_selected = np.bincount(labels[union].ravel(), minlength=n + 1)
    voxel_mm3 = 1.0 if spacing_zyx is None else float(np.prod(spacing_zyx))
    out = []
    for c in range(1, n + 1):
        if found[c]:
            continue
        if union is None:
            by = "prediction"
        else:
            by = "gate" if in_selected[c] < MIN_COVERED_FRACTION * counts[c] else "Focus"
        out.append(MissedLesion(c, _component_centre(labels, c, spacing_zyx), int(counts[c]),
                                float(counts[c]) * voxel_mm3, by))
    return labels, sorted(out, key=lambda m: (-m.voxels, m.component))


@dataclass(frozen=True)
class ViewRow:
    """One row of three views through centre_zyx; `missed`: the missed lesion it is there to show."""
    centre_zyx: Tuple[int, int, int]
    why: str
    missed: Optional[MissedLesion] = None


def choose_views(gt: Optional[np.ndarray], pred: Optional[np.ndarray], shape: Sequence[int],
                 spacing_zyx: Optional[Sequence[float]] = None, boxes: Optional[np.ndarray] = None,
                 selected: Optional[np.ndarray] = None, max_rows: int = MAX_VIEW_ROWS
                 ) -> Tuple[List[ViewRow], List[MissedLesion], int]:
    """The rows of a picture: the first through `choose_centre`'s lesion, then one through every lesion the
    prediction missed (`missed_lesions`, largest first) that the first row does not already go through.
    Returns (rows, all missed lesions, how many missed lesions got no row for want of `max_rows`)."""
    labels, missed = missed_lesions(gt, pred, boxes, selected, spacing_zyx)
    rows, hidden = view_rows(*choose_centre(gt, pred, shape, spacing_zyx), labels, missed, max_rows)
    return rows, missed, hidden


def view_rows(centre: Tuple[int, int, int], why: str, labels: Optional[np.ndarray], missed: Sequence[MissedLesion],
              max_rows: int = MAX_VIEW_ROWS) -> Tuple[List[ViewRow], int]:
    """`choose_views`' rows from the first row's centre and the missed lesions (`missed_lesions`' output):
    (rows, missed lesions left without a row)."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    first = next((m for m in missed if labels[centre] == m.component), None)
    rows = [ViewRow(centre, why + (f" ({first.describe()})" if first else ""), first)]
    rest = [m for m in missed if m is not first]
    rows += [ViewRow(m.centre_zyx, m.describe(), m) for m in rest[:max_rows - 1]]
    return rows, max(0, len(rest) - (max_rows - 1))


def choose_centre(gt: Optional[np.ndarray], pred: Optional[np.ndarray], shape: Sequence[int],
                  spacing_zyx: Optional[Sequence[float]] = None) -> Tuple[Tuple[int, int, int], str]:
    """(z, y, x) to slice through and a phrase saying why: the largest GT lesion, else the largest
    predicted lesion, else the volume centre."""
    for mask, what in ((gt, "the largest ground-truth lesion"), (pred, "the largest predicted lesion")):
        centre = largest_component_centre(mask, spacing_zyx)
        if centre is not None:
            return centre, what
    return tuple(int(s) // 2 for s in shape), "the volume centre (no lesion)"


def looks_like_hu(image: np.ndarray) -> bool:
    """CT in Hounsfield units has air (about -1000); normalised, MR or PET images have no values that low."""
    return float(np.min(image)) <= -500


def display_window(image: np.ndarray) -> Tuple[float, float]:
    """A soft-tissue window (-160..240 HU) for CT in HU, else the 1st-99th percentile."""
    if looks_like_hu(image):
        return HU_SOFT_TISSUE_WINDOW
    return percentile_window(image)


def percentile_window(*arrays: np.ndarray) -> Tuple[float, float]:
    """The 1st-99th percentile of the finite values (on a subsample of at most ~1M values)."""
    values = np.concatenate([np.asarray(a, np.float32).ravel()[::max(1, np.asarray(a).size // 1_000_000)]
                             for a in arrays])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(values, [1, 99]))
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    return (lo, hi) if hi > lo else (lo - 0.5, lo + 0.5)


def _parse_tiles(report: Optional[dict], shape: Sequence[int]):
    """(boxes (n, 3, 2) clipped to the image, scores (n,) with NaN where missing, selected (n,) bool)."""
    tiles = (report or {}).get("tiles") or []
    boxes, scores, selected = [], [], []
    for t in tiles:
        box = t.get("bbox_original") if isinstance(t, dict) else None
        try:
            box = np.clip(np.asarray(box, dtype=np.int64).reshape(3, 2), 0, np.asarray(shape)[:, None])
        except (TypeError, ValueError):
            continue  # a malformed tile cannot be drawn; the evaluator reports those
        if np.any(box[:, 1] <= box[:, 0]):
            continue
        score = t.get("score")
        boxes.append(box)
        scores.append(float(score) if isinstance(score, (int, float)) and np.isfinite(score) else np.nan)
        selected.append(bool(t.get("selected", False)))
    return (np.asarray(boxes, np.int64).reshape(-1, 3, 2), np.asarray(scores, np.float32),
            np.asarray(selected, bool))


def tile_maps(boxes: np.ndarray, scores: np.ndarray, selected: np.ndarray, shape: Sequence[int], axis: int,
              index: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
    """Per-pixel max Glance score (NaN where no scored tile) and the union of selected tiles in the
    view along ``axis``: the tiles whose box contains ``index`` on that axis, or all (a projection,
    ``index`` None)."""
    rows, cols = [d for d in range(3) if d != axis]
    score = np.full((shape[rows], shape[cols]), np.nan, np.float32)
    union = np.zeros((shape[rows], shape[cols]), bool)
    for box, s, sel in zip(boxes, scores, selected):
        if index is not None and not box[axis, 0] <= index < box[axis, 1]:
            continue
        window = (slice(*box[rows]), slice(*box[cols]))
        if not np.isnan(s):
            np.fmax(score[window], s, out=score[window])
        if sel:
            union[window] = True
    return score, union


# ---------------------------------------------------------------- title
def _num(v) -> Optional[float]:
    return float(v) if isinstance(v, (int, float, np.integer, np.floating)) and np.isfinite(v) else None


def format_title(numbers: Optional[dict]) -> str:
    """The numbers line of the title.

    Known keys (all optional): ``tiles_selected``, ``tiles_total``, ``selection_ratio``, ``dense``,
    ``n_found``, ``n_lesions``, ``n_pred_components`` (when there is no GT count), ``dsc``, ``nsd``,
    ``n_fp_components``. Any other key except ``case`` is appended as ``key value``.
    """
    numbers = dict(numbers or {})
    parts: List[str] = []
    sel, tot, ratio = (_num(numbers.pop(k, None)) for k in ("tiles_selected", "tiles_total", "selection_ratio"))
    dense = bool(numbers.pop("dense", False))
    if ratio is None and sel is not None and tot:
        ratio = sel / tot
    if sel is not None and tot is not None:
        parts.append(f"tiles {int(sel)}/{int(tot)} selected" + ("" if ratio is None else f" ({100 * ratio:.1f}%)"))
    elif ratio is not None:
        parts.append(f"selection ratio {100 * ratio:.1f}%")
    if dense:
        parts.append("dense")
    found, lesions = _num(numbers.pop("n_found", None)), _num(numbers.pop("n_lesions", None))
    n_pred = _num(numbers.pop("n_pred_components", None))
    if lesions is not None:
        parts.append(f"lesions found {int(found or 0)}/{int(lesions)}")
    elif n_pred is not None:
        parts.append(f"{int(n_pred)} predicted lesion(s)")
    for key, label in (("dsc", "DSC"), ("nsd", "NSD")):
        v = _num(numbers.pop(key, None))
        if v is not None:
            parts.append(f"{label} {v:.3f}")
    fp = _num(numbers.pop("n_fp_components", None))
    if fp is not None:
        parts.append(f"FP lesions {int(fp)}")
    numbers.pop("case", None)
    parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in numbers.items() if v is not None]
    return "  \u00b7  ".join(parts)


def title_numbers_from(per_case: dict, report: Optional[dict] = None) -> dict:
    """``render_case_figure``'s title numbers from an evaluator per-case entry (``evaluate_case``'s
    dict: dsc, nsd, n_lesions, n_found, n_fp_components) and the case's report, if any."""
    keys = ("case", "dsc", "nsd", "n_lesions", "n_found", "n_fp_components")
    out = {k: per_case[k] for k in keys if per_case.get(k) is not None}
    if report:
        tiles = report.get("tiles")
        out["tiles_total"] = report.get("tiles_total", len(tiles) if tiles is not None else None)
        out["tiles_selected"] = report.get(
            "tiles_selected", sum(bool(t.get("selected")) for t in tiles) if tiles is not None else None)
        out["selection_ratio"] = report.get("selection_ratio")
        if report.get("dense"):
            out["dense"] = True
        out = {k: v for k, v in out.items() if v is not None}
    return out
