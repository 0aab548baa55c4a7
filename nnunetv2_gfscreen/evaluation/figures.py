"""One picture per case: what the Glance looked at, what it selected, what the Focus found, and the truth.

Longer than 300 lines because one figure is one concept: views, overlays, legend and colorbar share its geometry.

``render_case_figure`` draws a CT in three orthogonal views (axial, coronal, sagittal), either the
slices through the centre of the largest ground-truth lesion (else the largest predicted lesion, else
the volume centre), plus a further row of slices through every ground-truth lesion the prediction missed
(`figure_data.choose_views`: a picture of a case that lost a lesion shows it), or maximum-intensity
projections, and lays over each view

- the Glance score of every tile covering a pixel (max where tiles overlap; a slice view only uses the
  tiles that intersect the slice) as a semi-transparent colormap,
- the outline of the union of the *selected* tiles' footprints,
- ground-truth lesion contours and predicted lesion contours, and missed lesions in their own colour
  (labelled by the stage that lost them: the gate, or the Focus),

with a legend, a Glance-score colorbar (the gate threshold marked) and the case's numbers in the title.

Conventions: arrays are (z, y, x) as SimpleITK's ``GetArrayFromImage`` returns them, and report tile
boxes (``bbox_original``) are half-open ``[[z0, z1], [y0, y1], [x0, x1]]`` in the same order (see
``predictors/case_summary.py``). The axial view is ``image[z]`` (rows y, columns x, row 0 on top); coronal
is ``image[:, y]`` (rows z, columns x) and sagittal ``image[:, :, x]`` (rows z, columns y), both with z
growing upward, which is superior-up for the usual LPS-oriented CT. Matplotlib is used through its
object API with the Agg canvas (no pyplot state), so figures may be rendered from worker threads.
"""
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunetv2_gfscreen.atomic import atomic_path
from nnunetv2_gfscreen.evaluation.figure_data import (ViewRow, _num, _parse_tiles, choose_centre, display_window,
                                                      format_title, missed_lesions, percentile_window, tile_maps,
                                                      view_rows)

VIEWS = ("slices", "mip", "mean")
VIEW_AXES = (("axial", 0), ("coronal", 1), ("sagittal", 2))
AXIS_NAMES = ("z", "y", "x")

GT_COLOUR = "#00ff00"  # lime
PRED_COLOUR = "#ff00ff"  # magenta
SELECTED_COLOUR = "#00e5ff"  # cyan
MISSED_COLOUR = "#ff2020"  # red: a ground-truth lesion the prediction missed
SCORE_CMAP = "inferno"
LOGIT_RANGE = 20.0  # the score shading spans logits -20 .. 20 (p from 2e-9 to 1 - 2e-9)


def _clip_logit(z: np.ndarray) -> np.ndarray:
    """Glance logits (report scores) clipped to the shading range."""
    return np.clip(np.asarray(z, np.float64), -LOGIT_RANGE, LOGIT_RANGE)


SCORE_ALPHA = (0.03, 0.42)  # overlay opacity at score 0 and 1: low scores barely tint the CT
SCORE_CMAP_RANGE = (0.15, 0.92)  # part of the colormap used: no near-black start, no washed-out top
CONTOUR_WIDTH = 1.6
SELECTED_WIDTH = 1.8
MISSED_WIDTH = 2.2

# panel geometry, inches
_PANEL_HEIGHT_MAX = 3.8
_PANELS_WIDTH_MAX = 12.0
_MIN_FIG_WIDTH = 8.5
_GAP = 0.2
_MIN_SLOT = 1.4  # a panel's slot is at least this wide, so that the panel titles never overlap
_SIDE = 0.25
_TOP = 0.95  # title lines + panel titles
_BOTTOM = 0.85  # legend and colorbar
_ROW_CAPTION = 0.4  # above each further row: which missed lesion it goes through
_ROWS_HEIGHT_MAX = 6.0  # several rows share this height ...
_ROW_HEIGHT_MIN = 2.2  # ... but a row is never lower than this


# ---------------------------------------------------------------- what to show
def _score_cmap():
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap
    base = colormaps[SCORE_CMAP].resampled(256)
    opaque = base(np.linspace(*SCORE_CMAP_RANGE, 256))
    colours = opaque.copy()
    colours[:, 3] = np.linspace(*SCORE_ALPHA, 256)
    return ListedColormap(colours, name="glance_score"), ListedColormap(opaque, name="glance_score_opaque")


def _outline(ax, mask: np.ndarray, colour: str, width: float, zorder: float) -> None:
    """The 0.5 contour of a 2D binary mask (pixel-edge outline, also along the image border),
    computed on the mask's bounding box only."""
    if not mask.any():
        return
    padded = np.pad(mask, 1).astype(np.float32)
    rows, cols = np.flatnonzero(padded.any(1)), np.flatnonzero(padded.any(0))
    r0, r1, c0, c1 = rows[0] - 1, rows[-1] + 2, cols[0] - 1, cols[-1] + 2
    ys, xs = np.arange(r0, r1) - 1, np.arange(c0, c1) - 1
    ax.contour(xs, ys, padded[r0:r1, c0:c1], levels=[0.5], colors=[colour], linewidths=width,
               zorder=zorder, antialiased=True)


def _runs(flags: np.ndarray) -> List[Tuple[int, int]]:
    """Half-open [start, stop) runs of True in a 1D bool array."""
    d = np.diff(np.concatenate(([0], flags.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


def pixel_edges(mask: np.ndarray) -> List[List[Tuple[float, float]]]:
    """The boundary of a 2D binary mask along pixel edges, as straight segments in (x, y) data
    coordinates (pixel (r, c) covers x in c +- 0.5, y in r +- 0.5); collinear edges are merged."""
    padded = np.pad(np.asarray(mask, bool), 1)
    segments = []
    horizontal = padded[1:, :] != padded[:-1, :]  # edge between padded rows i and i+1: y = i - 0.5
    for i in np.flatnonzero(horizontal.any(1)):
        segments += [[(c0 - 1.5, i - 0.5), (c1 - 1.5, i - 0.5)] for c0, c1 in _runs(horizontal[i])]
    vertical = padded[:, 1:] != padded[:, :-1]
    for j in np.flatnonzero(vertical.any(0)):
        segments += [[(j - 0.5, r0 - 1.5), (j - 0.5, r1 - 1.5)] for r0, r1 in _runs(vertical[:, j])]
    return segments


def _edge_outline(ax, mask: np.ndarray, colour: str, width: float, zorder: float) -> None:
    """Pixel-exact outline (tile footprints are rectangles: no corner rounding)."""
    from matplotlib.collections import LineCollection
    segments = pixel_edges(mask)
    if segments:
        ax.add_collection(LineCollection(segments, colors=colour, linewidths=width, zorder=zorder,
                                         capstyle="projecting"), autolim=False)


def _view_images(image, gt, pred, views: str, centre, missed=None):
    """Per view: (name, axis, index or None, 2D image, 2D gt, pred and missed-lesion masks or None)."""
    out = []
    for name, axis in VIEW_AXES:
        if views == "slices":
            index = centre[axis]
            take = lambda a: None if a is None else np.take(a, index, axis=axis)
            out.append((name, axis, index, take(image), take(gt), take(pred), take(missed)))
        else:
            proj = np.max if views == "mip" else np.mean
            take = lambda a: None if a is None else np.any(a, axis=axis)
            out.append((name, axis, None, proj(image, axis=axis), take(gt), take(pred), take(missed)))
    return out


def render_case_figure(image: np.ndarray, gt: Optional[np.ndarray], pred: Optional[np.ndarray],
                       report: Optional[dict], path: str, title_numbers: Optional[Dict] = None,
                       views: str = "slices", spacing_zyx: Optional[Sequence[float]] = None,
                       centre_zyx: Optional[Sequence[int]] = None, window: Optional[Tuple[float, float]] = None,
                       dpi: Optional[int] = None) -> str:
    """Write one PNG of a case to ``path`` (folders created, written atomically); returns ``path``.

    image, gt, pred: (z, y, x) arrays of one shape (gt or pred may be None: not drawn). report: the
    predictor's case report (``tiles`` with ``bbox_original``, ``score``, ``selected``; ``threshold``)
    or None (no tile shading). title_numbers: the case's numbers (see ``format_title``; ``case`` names
    the case, else the report's ``case``, else the file name). views: ``'slices'`` through
    ``centre_zyx`` (default: ``choose_centre``, plus a row through every missed lesion: ``view_rows``),
    ``'mip'`` maximum-intensity projections (masks:
    any along the ray, all tiles) or ``'mean'`` mean projections. spacing_zyx (mm) sets each view's
    pixel aspect and the views' relative sizes; without it voxels are drawn square. window: display
    range (default: soft-tissue window for HU, else 1st-99th percentile; projections always use the
    projections' percentiles). dpi: default 100, 150 for images wider than 300 voxels in-plane.
    """
    if views not in VIEWS:
        raise ValueError(f"views must be one of {VIEWS}, got {views!r}")
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be a 3D (z, y, x) array, got shape {image.shape}")
    masks = []
    for what, m in (("ground truth", gt), ("prediction", pred)):
        if m is not None:
            m = np.asarray(m) > 0
            if m.shape != image.shape:
                raise ValueError(f"{what} shape {m.shape} differs from image shape {image.shape} (z, y, x)")
        masks.append(m)
    gt, pred = masks
    shape = image.shape
    if dpi is None:
        dpi = 150 if max(shape[1:]) > 300 else 100
    spacing = np.ones(3) if spacing_zyx is None else np.asarray(spacing_zyx, float)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing) & (spacing > 0)):
        raise ValueError(f"spacing_zyx must be three positive numbers, got {spacing_zyx}")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    boxes, scores, selected = _parse_tiles(report, shape)
    has_scores = bool(np.any(~np.isnan(scores)))
    has_selected = bool(selected.any())
    threshold = _num((report or {}).get("threshold"))
    dense = bool((report or {}).get("dense"))
    # every lesion the prediction missed is outlined in its own colour, and (slices) gets a row of views through it
    labels, missed = missed_lesions(gt, pred, *((boxes, selected) if len(boxes) else (None, None)), spacing)
    missed_mask = np.isin(labels, [m.component for m in missed]) if missed else None
    hidden = 0
    if views == "slices":
        if centre_zyx is None:
            rows, hidden = view_rows(*choose_centre(gt, pred, shape, spacing), labels, missed)
        else:
            rows = [ViewRow(tuple(int(np.clip(c, 0, s - 1)) for c, s in zip(centre_zyx, shape)), "the given centre")]
        subtitle = f"slices through {rows[0].why}"
    else:
        rows = [None]
        subtitle = ("maximum" if views == "mip" else "mean") + "-intensity projections"
    if hidden:
        subtitle += f"; {hidden} more missed lesion(s) not shown"
    row_panels = [_view_images(image, gt, pred, views, None if row is None else row.centre_zyx,
                               missed_mask) for row in rows]
    panels = row_panels[0]
    if window is None:
        window = display_window(image) if views == "slices" else percentile_window(*(p[3] for p in panels))

    # geometry: rows of three views, one mm scale for all panels, top-aligned
    extents = []  # (height_mm, width_mm, row spacing, column spacing)
    for _, axis, *_ in panels:
        r, c = [d for d in range(3) if d != axis]
        extents.append((shape[r] * spacing[r], shape[c] * spacing[c], spacing[r], spacing[c]))
    row_height_max = min(_PANEL_HEIGHT_MAX, max(_ROW_HEIGHT_MIN, _ROWS_HEIGHT_MAX / len(rows)))
    scale = min(row_height_max / max(e[0] for e in extents), _PANELS_WIDTH_MAX / sum(e[1] for e in extents))
    widths = [e[1] * scale for e in extents]
    heights = [e[0] * scale for e in extents]
    slots = [max(w, _MIN_SLOT) for w in widths]
    panels_width = sum(slots) + _GAP * (len(slots) - 1)
    fig_w = max(_MIN_FIG_WIDTH, panels_width + 2 * _SIDE)
    row_h = max(heights)
    fig_h = _TOP + len(rows) * row_h + (len(rows) - 1) * _ROW_CAPTION + _BOTTOM
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)

    score_cmap, score_cmap_opaque = _score_cmap()
    # shaded by logit: a trained Glance is confident, and on the probability scale every tile near a lesion
    # looks the same (p = 0.99999 vs 0.9999998) while the threshold sits among them
    norm = Normalize(-LOGIT_RANGE, LOGIT_RANGE)
    for row_index, (row, panels) in enumerate(zip(rows, row_panels)):
        top = _TOP + row_index * (row_h + _ROW_CAPTION)  # inches from the figure's top to this row's panels
        if row_index:
            fig.text(0.5, 1 - (top - 0.2) / fig_h, row.why, ha="center", va="bottom", fontsize=8.5,
                     color=MISSED_COLOUR if row.missed else "0.3")
        left = (fig_w - panels_width) / 2
        for (name, axis, index, img2d, gt2d, pred2d, missed2d), w, slot, h, (_, _, sp_r, sp_c) in zip(
                panels, widths, slots, heights, extents):
            ax = fig.add_axes([(left + (slot - w) / 2) / fig_w, (fig_h - top - h) / fig_h, w / fig_w, h / fig_h])
            left += slot + _GAP
            origin = "upper" if axis == 0 else "lower"  # z up in coronal / sagittal
            aspect = sp_r / sp_c
            ax.imshow(img2d, cmap="gray", vmin=window[0], vmax=window[1], interpolation="antialiased",
                      origin=origin, aspect=aspect, zorder=0)
            score2d, union = tile_maps(boxes, scores, selected, shape, axis, index)
            if has_scores:
                ax.imshow(np.ma.masked_invalid(_clip_logit(score2d)), cmap=score_cmap, norm=norm,
                          interpolation="nearest", origin=origin, aspect=aspect, zorder=1)
            _edge_outline(ax, union, SELECTED_COLOUR, SELECTED_WIDTH, zorder=2)
            for m, colour, z, width in ((gt2d, GT_COLOUR, 4, CONTOUR_WIDTH), (pred2d, PRED_COLOUR, 3, CONTOUR_WIDTH),
                                        (missed2d, MISSED_COLOUR, 5, MISSED_WIDTH)):
                if m is not None:
                    _outline(ax, m, colour, width, zorder=z)
            ax.set_xlim(-0.5, img2d.shape[1] - 0.5)
            ax.set_ylim(*((img2d.shape[0] - 0.5, -0.5) if origin == "upper" else (-0.5, img2d.shape[0] - 0.5)))
            ax.set_xticks([])
            ax.set_yticks([])
            where = "projection" if index is None else f"{AXIS_NAMES[axis]} = {index}"
            ax.set_title(f"{name}  ({where})", fontsize=9, pad=3)

    # title
    case = (title_numbers or {}).get("case") or (report or {}).get("case") \
        or os.path.basename(path).split(".")[0]
    fig.text(0.5, 1 - 0.12 / fig_h, str(case), ha="center", va="top", fontsize=12, fontweight="bold")
    line = format_title(title_numbers)
    if line:
        fig.text(0.5, 1 - 0.36 / fig_h, line, ha="center", va="top", fontsize=9.5)
    fig.text(0.5, 1 - 0.56 / fig_h, subtitle, ha="center", va="top", fontsize=8, color="0.4")

    # legend (left) and colorbar (right) under the panels
    handles = []
    if gt is not None:
        handles.append(Line2D([], [], color=GT_COLOUR, lw=2.2,
                              label="ground truth" + ("" if gt.any() else " (empty)")))
    if pred is not None:
        handles.append(Line2D([], [], color=PRED_COLOUR, lw=2.2,
                              label="prediction" + ("" if pred.any() else " (empty)")))
    if missed:
        stages = sorted({m.missed_by for m in missed})
        handles.append(Line2D([], [], color=MISSED_COLOUR, lw=2.2,
                              label=f"missed lesion ({', '.join(stages)})"))
    if has_selected:
        handles.append(Line2D([], [], color=SELECTED_COLOUR, lw=2.2,
                              label="selected tiles" + (" (dense: all)" if dense else "")))
    if not len(boxes):
        handles.append(Patch(facecolor="none", edgecolor="none",
                             label="no report: tiles not shown" if report is None else "no tiles in the report"))
    bar_w = 2.6 if has_scores else 0.0
    if handles:
        fig.legend(handles=handles, loc="center left", ncol=len(handles),
                   bbox_to_anchor=(_SIDE / fig_w, 0.42 / fig_h), fontsize=8.5, frameon=False,
                   handlelength=1.8, columnspacing=1.2)
    if has_scores:
        cax = fig.add_axes([(fig_w - _SIDE - bar_w) / fig_w, 0.45 / fig_h, bar_w / fig_w, 0.13 / fig_h])
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=score_cmap_opaque), cax=cax, orientation="horizontal")
        bar.set_ticks([-LOGIT_RANGE, -LOGIT_RANGE / 2, 0, LOGIT_RANGE / 2, LOGIT_RANGE])
        bar.ax.tick_params(labelsize=7, length=2, pad=1)
        label = "Glance logit, tile max"
        if threshold is not None and np.isfinite(threshold):
            bar.ax.axvline(float(np.clip(threshold, -LOGIT_RANGE, LOGIT_RANGE)), color=SELECTED_COLOUR, lw=2)
            label += f"; threshold {threshold:.3g}"
        bar.set_label(label, fontsize=8, labelpad=2)
        cax.xaxis.set_label_position("top")

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", facecolor="white")
    return path
