"""What a calibration certifies (core/operating_point.py), on counts computed by hand."""
import numpy as np
import pytest

from nnunetv2_gfscreen.core.coverage import CaseCoverage
from nnunetv2_gfscreen.core.operating_point import (cases_needed, certificate, clopper_pearson_lower, crc_certified,
                                                    fit_threshold, loco_margin, mean_miss, threshold_for_selection)


def case(lesion_scores, tile_scores, volumes=None, floor=None):
    lesion_scores = np.asarray(lesion_scores, np.float64)
    tiles = np.asarray(tile_scores, np.float64)
    return CaseCoverage(tiles, np.zeros(len(tiles), bool), np.zeros(0), np.zeros(0, np.int64), lesion_scores,
                        np.ones(len(lesion_scores), np.int64),
                        None if volumes is None else np.asarray(volumes, np.float64),
                        None if floor is None else np.asarray(floor, bool))


def test_clopper_pearson_by_hand():
    # all m covered: the bound is (1 - confidence)^(1/m): 5 lesions certify only 55%, 59 certify 95%, 149 certify 98%
    assert clopper_pearson_lower(5, 5) == pytest.approx(0.05 ** (1 / 5))
    assert clopper_pearson_lower(5, 5) == pytest.approx(0.5493, abs=1e-4)
    assert clopper_pearson_lower(59, 59) > 0.95 > clopper_pearson_lower(58, 58)
    assert clopper_pearson_lower(149, 149) > 0.98 > clopper_pearson_lower(148, 148)
    assert clopper_pearson_lower(0, 5) == 0.0 and clopper_pearson_lower(0, 0) is None
    # 4 of 5: the p at which P(X >= 4 | n = 5, p) = 0.05, by bisection
    lo, hi = 0.0, 1.0
    for _ in range(60):
        p = (lo + hi) / 2
        lo, hi = (lo, p) if p ** 5 + 5 * p ** 4 * (1 - p) > 0.05 else (p, hi)
    assert clopper_pearson_lower(4, 5) == pytest.approx(lo, abs=1e-9)


def test_conformal_risk_control_by_hand():
    assert crc_certified(0.0, 4) == pytest.approx(0.8)           # 1 - 1/5
    assert crc_certified(0.1, 9) == pytest.approx(0.81)          # 1 - (0.9 + 1) / 10
    assert cases_needed(0.98) == 49 and cases_needed(0.9) == 9 and cases_needed(0.95) == 19
    assert crc_certified(0.0, 49) == pytest.approx(0.98)


def test_certified_threshold_when_the_cases_suffice():
    # 9 cases with one lesion each, scores 1..9; target 0.8 allows a mean loss of (10 * 0.2 - 1) / 9 = 1/9: one
    # lesion may be missed, so the threshold goes just below the second-lowest lesion (midpoint of tiles 1 and 2)
    cases = [case([s], [s, -5.0]) for s in range(1, 10)]
    fit = fit_threshold(cases, 0.8)
    assert fit.target_certifiable and fit.margin is None
    assert fit.threshold == pytest.approx(1.5)
    assert mean_miss(cases, fit.threshold) == pytest.approx(1 / 9)
    cert = certificate(cases, fit.threshold, 0.8)
    assert cert["expected_sensitivity_certified"] == pytest.approx(0.8)
    assert (cert["lesions"], cert["lesions_covered"]) == (9, 8)
    assert cert["lesion_sensitivity_lower_bound"] == pytest.approx(clopper_pearson_lower(8, 9))


def test_too_few_cases_cover_every_lesion_and_go_below_by_the_leave_one_case_out_margin():
    a = case([10.0], [0.0, 10.0])
    b = case([4.0], [0.0, 4.0])
    fit = fit_threshold([a, b], 0.98)
    assert not fit.target_certifiable
    # in sample: just below the weakest lesion (midpoint of tile scores 0 and 4) = 2
    assert fit.in_sample == pytest.approx(2.0)
    # leave one out: fitted on a alone, b is at threshold 5 (midpoint of 0 and 10) and its lesion (4) is missed by 1
    assert loco_margin([a, b], 0.98) == pytest.approx(1.0, abs=1e-5)
    assert fit.threshold == pytest.approx(1.0, abs=1e-5)
    cert = certificate([a, b], fit.threshold, 0.98)
    assert cert["expected_sensitivity_certified"] == pytest.approx(2 / 3)  # 1 - 1/3: all the cases can certify
    assert not cert["target_certifiable"] and cert["cases_needed_for_target"] == 49
    with pytest.raises(ValueError, match="no lesion"):
        fit_threshold([case([], [0.0, 1.0])], 0.98)


def test_floor_tiles_count_as_selected_and_lesions_they_cover_are_never_missed():
    covered_by_floor = case([np.inf], [-9.0, -8.0], floor=[True, False])
    other = case([3.0], [3.0, -1.0])
    fit = fit_threshold([covered_by_floor, other], 0.98)
    assert fit.in_sample == pytest.approx(1.0)  # only the other case's lesion constrains the threshold
    # selection: the floor tile is selected at every threshold (1 of 4 tiles even at the top)
    assert threshold_for_selection([covered_by_floor, other], 0.25) == pytest.approx(3.0)


def test_size_bins_by_volume():
    cases = [case([5.0, -5.0, 5.0], [5.0, -5.0], volumes=[100.0, 1000.0, 9000.0])]
    bins = certificate(cases, 0.0, 0.9)["size_bins"]
    assert [(b["lesions"], b["covered"]) for b in bins] == [(1, 1), (1, 0), (1, 1)]
    assert [b["bin"] for b in bins] == ["<500 mm3", "500-5000 mm3", ">=5000 mm3"]
