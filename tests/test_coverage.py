"""Lesion coverage maths of gate calibration (coverage.py) on small hand-built arrays."""
import numpy as np
import pytest

from nnunetv2_gfscreen.core.coverage import (CaseCoverage, case_coverage, case_miss_rate, central_boxes, curve_at,
                                             operating_curve, thin_curve, threshold_for_target)


def _grid(shape, patch, starts_y, starts_x):
    """Boxes (T, 3, 2) of tiles spanning all z, at the given y and x starts."""
    return np.array([[[0, shape[0]], [y, y + patch], [x, x + patch]] for y in starts_y for x in starts_x])


def _union(shape, boxes, selected, margin=0.0):
    """Brute force: the union of the selected boxes' (central) regions."""
    m = np.zeros(shape, bool)
    for b in central_boxes(boxes, shape, margin)[selected]:
        m[tuple(slice(lo, hi) for lo, hi in b)] = True
    return m


def test_lesion_inside_one_tile_with_slivers_in_three_others():
    shape = (4, 14, 14)
    boxes = _grid(shape, 8, (0, 6), (0, 6))  # tiles (0,0), (0,6), (6,0), (6,6)
    lesion = np.zeros(shape, bool)
    lesion[:, 2:7, 2:7] = True  # all in tile (0,0); row y=6 / column x=6 / voxel (6,6) in the others
    scores = np.array([0.9, 0.2, 0.3, 0.1], np.float32)
    cov = case_coverage(lesion, boxes, scores)
    assert cov.tile_labels.tolist() == [True, True, True, True]
    assert cov.n_lesions == 1 and cov.lesion_scores[0] == pytest.approx(0.9)
    curve = operating_curve([cov])
    row = {k: v[0] for k, v in operating_curve([cov], [0.5]).items()}  # only the tile holding the whole lesion
    assert row["selection_ratio"] == 0.25 and row["tile_sensitivity"] == 0.25
    assert row["lesion_sensitivity"] == 1.0 and row["voxel_coverage"] == 1.0
    # the three slivers together hold only 9 of 25 voxels per slice: they could not cover it on their own
    slivers = _union(shape, boxes, np.array([False, True, True, True]))
    assert slivers[lesion].mean() == pytest.approx(9 / 25)
    # the calibration rule keeps only the containing tile: the highest threshold with every lesion covered
    t = threshold_for_target(curve, 1.0)
    assert 0.3 < t < 0.9
    assert threshold_for_target(curve, 1.0, column="tile_sensitivity") < 0.1  # tile sensitivity needs all four


def test_lesion_split_so_that_only_two_tiles_together_cover_it():
    shape = (2, 8, 14)
    boxes = np.array([[[0, 2], [0, 8], [0, 8]], [[0, 2], [0, 8], [6, 14]]])
    lesion = np.zeros(shape, bool)
    lesion[:, 3:5, 3:11] = True  # x 3..10: 5 of 8 columns in each tile, together all of them
    cov = case_coverage(lesion, boxes, np.array([0.7, 0.4], np.float32))
    assert cov.lesion_scores[0] == pytest.approx(0.4)  # covered only while both are selected
    assert cov.at(0.5)["lesion_coverage"] == 0.0 and cov.at(0.5)["voxel_coverage"] == pytest.approx(5 / 8)
    assert cov.at(0.3)["lesion_coverage"] == 1.0 and cov.at(0.3)["voxel_coverage"] == 1.0


def _random_cases(rng, n_cases=4, shape=(6, 20, 20)):
    starts = (0, 4, 8, 12)
    boxes = _grid(shape, 8, starts, starts)
    out = []
    for _ in range(n_cases):
        lesion = np.zeros(shape, bool)
        for _ in range(3):
            z, y, x = rng.integers(0, 5), rng.integers(0, 17), rng.integers(0, 17)
            lesion[z:z + rng.integers(1, 3), y:y + rng.integers(1, 4), x:x + rng.integers(1, 4)] = True
        scores = rng.random(len(boxes)).astype(np.float32)
        scores[:3] = scores[3]  # ties
        out.append((lesion, boxes, scores))
    return out


@pytest.mark.parametrize("margin", [0.0, 0.25])
def test_curve_is_monotone_and_matches_brute_force(margin):
    import cc3d
    rng = np.random.default_rng(0)
    raw = _random_cases(rng)
    cases = [case_coverage(lesion, boxes, scores, margin) for lesion, boxes, scores in raw]
    curve = operating_curve(cases)
    for key in ("selection_ratio", "voxel_coverage", "lesion_sensitivity", "tile_sensitivity"):
        assert np.all(np.diff(curve[key]) <= 1e-12), key
    assert np.all(np.diff(curve["threshold"]) > 0)
    for t in curve["threshold"][::3]:
        covered = lesions = vox = vox_cov = 0
        for lesion, boxes, scores in raw:
            union = _union(lesion.shape, boxes, scores > np.float32(t), margin)
            vox, vox_cov = vox + lesion.sum(), vox_cov + (union & lesion).sum()
            labels, n = cc3d.connected_components(lesion, connectivity=26, return_N=True)
            lesions += n
            covered += sum((union[labels == i]).mean() >= 0.9 for i in range(1, n + 1))
        row = curve_at(curve, t)
        assert row["voxel_coverage"] == pytest.approx(vox_cov / vox)
        assert row["lesion_sensitivity"] == pytest.approx(covered / lesions)


def test_chosen_threshold_is_the_highest_reaching_the_target():
    rng = np.random.default_rng(1)
    cases = [case_coverage(*c) for c in _random_cases(rng, 6)]
    curve = operating_curve(cases)
    sens = np.array(curve["lesion_sensitivity"])
    for target in (0.5, 0.8, 0.98, 1.0):
        t = threshold_for_target(curve, target)
        i = curve["threshold"].index(t)
        assert sens[i] >= target and np.all(sens[i + 1:] < target)
        lesion_scores = np.concatenate([c.lesion_scores for c in cases])
        assert (lesion_scores > np.float32(t)).mean() >= target


def _case(tile_scores, lesion_scores):
    tile_scores = np.asarray(tile_scores, np.float32)
    lesion_scores = np.asarray(lesion_scores, np.float32)
    return CaseCoverage(tile_scores, tile_scores >= lesion_scores.min(initial=2), np.sort(lesion_scores),
                        np.ones(len(lesion_scores), np.int64), lesion_scores, np.ones(len(lesion_scores), np.int64))


def test_tile_margin_counts_only_central_regions():
    shape = (2, 4, 16)
    boxes = np.array([[[0, 2], [0, 4], [x, x + 8]] for x in (0, 4, 8)])
    central = central_boxes(boxes, shape, 0.25)  # 2 voxels off each inner face, none at the image border
    assert central[:, 2].tolist() == [[0, 6], [6, 10], [10, 16]]
    assert central[:, 1].tolist() == [[0, 4]] * 3
    lesion = np.zeros(shape, bool)
    lesion[:, 1:3, 4:6] = True  # in tiles 0 and 1, but only in tile 0's central region
    scores = np.array([0.2, 0.9, 0.1], np.float32)
    assert case_coverage(lesion, boxes, scores).lesion_scores[0] == pytest.approx(0.9)
    assert case_coverage(lesion, boxes, scores, tile_margin=0.25).lesion_scores[0] == pytest.approx(0.2)
    # a margin so wide that the central regions leave gaps: a lesion in a gap is never covered
    gap = case_coverage(lesion, boxes, scores, tile_margin=0.45)
    assert gap.lesion_scores[0] == -np.inf and gap.at(0.0)["lesion_coverage"] == 0.0
    with pytest.raises(ValueError, match="tile_margin"):
        central_boxes(boxes, shape, 0.5)


def test_unreachable_target_selects_everything_and_no_lesion_is_an_error():
    curve = {"threshold": [0.1, 0.5], "selection_ratio": [1.0, 0.0], "lesion_sensitivity": [0.5, 0.0]}
    assert threshold_for_target(curve, 0.9) == 0.1
    healthy = operating_curve([case_coverage(np.zeros((2, 4, 4), bool), np.array([[[0, 2], [0, 4], [0, 4]]]),
                                             np.array([0.3], np.float32))])
    assert healthy["lesion_sensitivity"] == [None, None]
    with pytest.raises(ValueError, match="no lesion_sensitivity"):
        threshold_for_target(healthy, 0.9)


def test_thinned_curve_keeps_the_chosen_threshold_and_target_picks():
    rng = np.random.default_rng(2)
    cases = [case_coverage(*c) for c in _random_cases(rng, 40)]
    curve = operating_curve(cases)
    n = len(curve["threshold"])
    assert n > 300
    keep = curve["threshold"][n // 3 + 1]
    thin = thin_curve(curve, [keep], max_points=50)
    assert len(thin["threshold"]) < n and keep in thin["threshold"]
    for target in (0.5, 0.9, 1.0):
        assert threshold_for_target(thin, target) == threshold_for_target(curve, target)
    row = curve_at(thin, keep)
    assert row["threshold"] == keep and row["selection_ratio"] == curve_at(curve, keep)["selection_ratio"]
    assert thin_curve(curve, [], max_points=n) is curve


def test_floor_tiles_cover_their_central_regions_at_every_threshold():
    shape = (4, 14, 14)
    boxes = _grid(shape, 8, (0, 6), (0, 6))
    lesion = np.zeros(shape, bool)
    lesion[:, 2:5, 2:5] = True          # only in tile (0,0)
    scores = np.array([-30.0, 5.0, 4.0, 3.0])
    plain = case_coverage(lesion, boxes, scores)
    floored = case_coverage(lesion, boxes, scores, floor=np.array([True, False, False, False]))
    assert plain.lesion_scores.tolist() == [-30.0] and floored.lesion_scores.tolist() == [np.inf]
    assert plain.at(0.0)["tiles_selected"] == 3 and floored.at(0.0)["tiles_selected"] == 4
    assert floored.at(100.0)["tiles_selected"] == 1 and floored.at(100.0)["lesions_covered"] == 1
    curve = operating_curve([floored], [100.0])
    assert curve["selection_ratio"] == [0.25] and curve["lesion_sensitivity"] == [1.0]


def test_case_miss_rate_averages_over_cases_not_lesions():
    one = CaseCoverage(np.zeros(2), np.zeros(2, bool), np.zeros(0), np.zeros(0, np.int64), np.array([1.0]),
                       np.ones(1, np.int64))
    four = CaseCoverage(np.zeros(2), np.zeros(2, bool), np.zeros(0), np.zeros(0, np.int64),
                        np.array([1.0, 5.0, 5.0, 5.0]), np.ones(4, np.int64))
    healthy = CaseCoverage(np.zeros(2), np.zeros(2, bool), np.zeros(0), np.zeros(0, np.int64), np.zeros(0),
                           np.zeros(0, np.int64))
    # at t = 2: case one misses 1/1, case four misses 1/4 -> (1 + 0.25) / 2; the healthy case does not count
    assert case_miss_rate([one, four, healthy], np.array([0.0, 2.0, 9.0])) == [0.0, 0.625, 1.0]
    curve = operating_curve([one, four, healthy], np.array([2.0]))
    assert curve["lesion_sensitivity"] == [0.6] and curve["case_miss_rate"] == [0.625]


def test_size_bin_columns_and_volumes():
    shape = (4, 20, 20)
    boxes = np.array([[[0, 4], [0, 20], [0, 20]]])
    lesion = np.zeros(shape, bool)
    lesion[0, 0:2, 0:2] = True       # 4 voxels
    lesion[2:4, 10:20, 10:20] = True  # 200 voxels
    cov = case_coverage(lesion, boxes, np.array([1.0]), voxel_volume=5.0)
    assert sorted(cov.lesion_volumes.tolist()) == [20.0, 1000.0]
    curve = operating_curve([cov], np.array([0.0, 2.0]))
    assert curve["lesion_sensitivity_lt500"] == [1.0, 0.0] and curve["lesion_sensitivity_500to5000"] == [1.0, 0.0]
    assert curve["lesion_sensitivity_ge5000"] == [None, None]
    assert CaseCoverage.from_dict(cov.to_dict()).lesion_volumes.tolist() == cov.lesion_volumes.tolist()
