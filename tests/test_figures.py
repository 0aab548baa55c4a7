import numpy as np
import pytest
from matplotlib import colors as mcolors
from matplotlib import image as mimage

from nnunetv2_gfscreen.evaluation import figures
from nnunetv2_gfscreen.evaluation.figure_data import (HU_SOFT_TISSUE_WINDOW, _parse_tiles, choose_centre, choose_views,
                                                      display_window, format_title, tile_maps, title_numbers_from)
from nnunetv2_gfscreen.evaluation.figures import render_case_figure
from nnunetv2_gfscreen.predictors.case_summary import save_case_png

SHAPE = (20, 48, 56)
SPACING = (2.5, 0.8, 0.8)


def _case():
    """A CT-like volume in HU (air around a 40 HU body), a GT lesion, a prediction overlapping it
    plus a false positive, and a report whose tiles (10, 24, 28) at step 0.5 select the lesion's tiles."""
    rng = np.random.default_rng(0)
    image = np.full(SHAPE, -1000, np.int16)
    image[2:18, 6:42, 6:50] = 40 + rng.normal(0, 10, (16, 36, 44)).astype(np.int16)
    gt = np.zeros(SHAPE, bool)
    gt[8:12, 14:22, 16:24] = True  # the larger lesion
    gt[15, 40, 40] = True  # a one-voxel lesion
    pred = np.zeros(SHAPE, bool)
    pred[9:13, 15:23, 17:25] = True
    pred[3:5, 30:34, 40:44] = True  # false positive
    image[gt] = 120
    tiles = []
    for z in (0, 5, 10):
        for y in (0, 12, 24):
            for x in (0, 14, 28):
                box = [[z, z + 10], [y, y + 24], [x, x + 28]]
                hit = bool(gt[z:z + 10, y:y + 24, x:x + 28].any())
                tiles.append({"bbox_original": box, "score": 0.9 if hit else 0.1, "selected": hit})
    n_sel = sum(t["selected"] for t in tiles)
    report = {"case": "case_1", "tiles": tiles, "tiles_total": len(tiles), "tiles_selected": n_sel,
              "selection_ratio": n_sel / len(tiles), "threshold": 0.5, "dense": False, "lesions": [{}, {}]}
    return image, gt, pred, report


def _panel_pixels(png_path, dpi=100):
    """RGB pixels of the band holding the three views (between the title and the legend)."""
    rgb = mimage.imread(png_path)[..., :3]
    top = int(figures._TOP * dpi)
    bottom = rgb.shape[0] - int(figures._BOTTOM * dpi)
    return rgb[top:bottom]


def _has_colour(pixels, colour, tol=0.12):
    return bool((np.abs(pixels - np.asarray(mcolors.to_rgb(colour))).max(-1) < tol).sum() >= 5)


def test_render_case_figure_draws_views_tiles_and_contours(tmp_path):
    image, gt, pred, report = _case()
    numbers = {"case": "case_1", "tiles_selected": report["tiles_selected"], "tiles_total": 27,
               "selection_ratio": report["selection_ratio"], "n_found": 1, "n_lesions": 2, "dsc": 0.61,
               "n_fp_components": 1}
    path = render_case_figure(image, gt, pred, report, str(tmp_path / "sub" / "case_1.png"), numbers,
                              spacing_zyx=SPACING)
    assert path == str(tmp_path / "sub" / "case_1.png")
    rgb = mimage.imread(path)
    # two rows of views: through the larger lesion, and through the one-voxel lesion the prediction missed
    assert 700 <= rgb.shape[0] <= 1000 and 800 <= rgb.shape[1] <= 1500
    assert not list((tmp_path / "sub").glob("*.partial*"))
    panels = _panel_pixels(path)
    for colour in (figures.GT_COLOUR, figures.PRED_COLOUR, figures.SELECTED_COLOUR, figures.MISSED_COLOUR):
        assert _has_colour(panels, colour), colour
    found_only = render_case_figure(image, gt, pred | gt, report, str(tmp_path / "f.png"), numbers,
                                    spacing_zyx=SPACING)
    assert mimage.imread(found_only).shape[0] <= 600  # one row when nothing is missed
    assert not _has_colour(_panel_pixels(found_only), figures.MISSED_COLOUR)


def test_no_report_means_no_tile_outline_and_mip_works(tmp_path):
    image, gt, pred, _ = _case()
    path = render_case_figure(image, gt, pred, None, str(tmp_path / "a.png"), {"case": "a", "dsc": 0.5})
    panels = _panel_pixels(path)
    assert _has_colour(panels, figures.GT_COLOUR) and _has_colour(panels, figures.PRED_COLOUR)
    assert not _has_colour(panels, figures.SELECTED_COLOUR)
    _, gt_, pred_, report = _case()
    mip = render_case_figure(image, gt_, pred_, report, str(tmp_path / "m.png"), None, views="mip",
                             spacing_zyx=SPACING)
    assert _has_colour(_panel_pixels(mip), figures.SELECTED_COLOUR)
    with pytest.raises(ValueError, match="views"):
        render_case_figure(image, gt, pred, None, str(tmp_path / "x.png"), views="coronal")
    with pytest.raises(ValueError, match="prediction shape"):
        render_case_figure(image, gt, pred[:-1], None, str(tmp_path / "x.png"))


def test_choose_centre_prefers_largest_gt_then_prediction():
    image, gt, pred, _ = _case()
    centre, why = choose_centre(gt, pred, SHAPE)
    assert gt[centre] and "ground-truth" in why
    assert 8 <= centre[0] < 12 and 14 <= centre[1] < 22 and 16 <= centre[2] < 24
    empty = np.zeros(SHAPE, bool)
    centre, why = choose_centre(empty, pred, SHAPE)
    assert pred[centre] and 9 <= centre[0] < 13 and "predicted" in why
    assert choose_centre(empty, None, SHAPE)[0] == (10, 24, 28)


def test_chosen_views_go_through_every_missed_lesion_and_name_the_stage():
    """A large lesion found, a small one outside the selected tiles (the gate lost it) and a small one inside them
    (the Focus lost it): the first row goes through the large lesion, one row through each missed lesion."""
    shape = (16, 32, 32)
    gt = np.zeros(shape, bool)
    gt[4:10, 4:12, 4:12] = True      # large, found
    gt[12:14, 26:28, 26:28] = True   # 8 voxels, in no selected tile
    gt[2, 20, 4] = True              # 1 voxel, in the selected tile
    pred = np.zeros(shape, bool)
    pred[5:9, 5:11, 5:11] = True
    boxes = np.array([[[0, 16], [0, 24], [0, 16]], [[0, 16], [16, 32], [16, 32]]])
    selected = np.array([True, False])
    spacing = (2.0, 1.0, 1.0)
    rows, missed, hidden = choose_views(gt, pred, shape, spacing, boxes, selected)
    assert len(rows) == 3 and hidden == 0 and rows[0].missed is None
    assert 4 <= rows[0].centre_zyx[0] < 10 and gt[rows[0].centre_zyx]
    by_stage = {r.missed.missed_by: r for r in rows[1:]}
    gate, focus = by_stage["gate"], by_stage["Focus"]
    assert 12 <= gate.centre_zyx[0] < 14 and 26 <= gate.centre_zyx[1] < 28 and 26 <= gate.centre_zyx[2] < 28
    assert (gate.missed.voxels, gate.missed.volume_mm3) == (8, 16.0) and "gate" in gate.why
    assert focus.centre_zyx == (2, 20, 4) and focus.missed.voxels == 1
    assert [m.voxels for m in missed] == [8, 1]   # largest first
    # one row only: the missed lesions are listed but not shown, and the count says so
    rows, missed, hidden = choose_views(gt, pred, shape, spacing, boxes, selected, max_rows=1)
    assert len(rows) == 1 and len(missed) == 2 and hidden == 2
    # the large lesion missed too: its own row (the first) says so, no second row through it
    rows, missed, _ = choose_views(gt, np.zeros(shape, bool), shape, spacing, boxes, selected)
    assert len(rows) == 3 and rows[0].missed is not None and rows[0].missed.voxels == 384
    assert "missed by the gate" not in rows[0].why and "missed by the Focus" in rows[0].why
    # without tiles the stage is unknown; without a prediction nothing counts as missed
    assert {m.missed_by for m in choose_views(gt, pred, shape)[1]} == {"prediction"}
    assert choose_views(gt, None, shape)[1] == [] and len(choose_views(gt, None, shape)[0]) == 1


def test_tile_maps_take_max_score_and_slice_intersection():
    report = {"tiles": [{"bbox_original": [[0, 4], [0, 4], [0, 4]], "score": 0.2, "selected": True},
                        {"bbox_original": [[2, 6], [2, 6], [2, 6]], "score": 0.7, "selected": False},
                        {"bbox_original": [[0, 9], [0, 99], [0, 1]], "score": None, "selected": True},
                        {"bbox_original": [[3, 3], [0, 4], [0, 4]], "score": 1.0, "selected": True}]}  # empty
    boxes, scores, selected = _parse_tiles(report, (8, 8, 8))
    assert len(boxes) == 3 and boxes[2, 1].tolist() == [0, 8]  # clipped; the empty box is skipped
    score, union = tile_maps(boxes, scores, selected, (8, 8, 8), axis=0, index=3)  # all three
    assert score[3, 3] == pytest.approx(0.7) and score[1, 1] == pytest.approx(0.2)
    assert np.isnan(score[7, 7]) and union[:4, :4].all() and union[:, 0].all() and not union[5, 5]
    score, union = tile_maps(boxes, scores, selected, (8, 8, 8), axis=0, index=5)  # only tiles 1 and 2
    assert np.isnan(score[1, 1]) and score[3, 3] == pytest.approx(0.7) and not union[1, 1]
    score, _ = tile_maps(boxes, scores, selected, (8, 8, 8), axis=2, index=None)  # projection: rows z, cols y
    assert score.shape == (8, 8) and score[1, 1] == pytest.approx(0.2) and score[5, 5] == pytest.approx(0.7)


def test_window_and_title():
    assert display_window(np.array([-1000, 0, 300])) == HU_SOFT_TISSUE_WINDOW
    lo, hi = display_window(np.linspace(-2, 3, 1000))
    assert -2 < lo < -1.9 and 2.9 < hi < 3
    line = format_title({"case": "x", "tiles_selected": 3, "tiles_total": 12, "n_found": 1, "n_lesions": 2,
                         "dsc": 0.5, "n_fp_components": 0, "extra": 1.5})
    assert line == ("tiles 3/12 selected (25.0%)  \u00b7  lesions found 1/2  \u00b7  DSC 0.500  \u00b7  "
                    "FP lesions 0  \u00b7  extra 1.5")
    numbers = title_numbers_from({"case": "x", "dsc": 0.5, "nsd": 0.4, "n_lesions": 2, "n_found": 1,
                                  "n_fp_components": 0, "gt_voxels": 10},
                                 {"tiles": [{"selected": True}, {"selected": False}]})
    assert numbers == {"case": "x", "dsc": 0.5, "nsd": 0.4, "n_lesions": 2, "n_found": 1, "n_fp_components": 0,
                       "tiles_total": 2, "tiles_selected": 1}


def test_predictor_png_delegates(tmp_path):
    image, _, pred, report = _case()
    path = save_case_png(image.astype(np.float32), pred.astype(np.uint8), report, str(tmp_path / "p.png"))
    panels = _panel_pixels(path)
    assert _has_colour(panels, figures.PRED_COLOUR) and _has_colour(panels, figures.SELECTED_COLOUR)
    assert not _has_colour(panels, figures.GT_COLOUR)
