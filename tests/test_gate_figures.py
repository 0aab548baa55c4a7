"""Gate figures on test cases (evaluation/gate.py): AUC, coverage at the applied gate, the random baseline."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_gfscreen.evaluation.gate import (cases_from_reports, central_labels, decision_summary, gate_figures,
                                              gate_figures_from_folders, random_gate_coverage, tile_auc)


def _report(case, boxes, scores, selected):
    return {"case": case, "tiles": [{"bbox_original": b, "score": s, "selected": k}
                                    for b, s, k in zip(boxes, scores, selected)]}


# a 8x16x16 volume cut into 4 tiles of 8x8x8 along y and x (no overlap), one lesion inside tile 3
BOXES = [[[0, 8], [0, 8], [0, 8]], [[0, 8], [0, 8], [8, 16]], [[0, 8], [8, 16], [0, 8]], [[0, 8], [8, 16], [8, 16]]]


def _gt():
    gt = np.zeros((8, 16, 16), np.uint8)
    gt[2:5, 10:13, 10:13] = 1
    return gt


def test_tile_auc_by_hand():
    assert tile_auc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert tile_auc([0.1, 0.8, 0.9, 0.2], [True, True, False, False]) == 0.25
    assert tile_auc([0.5, 0.5], [True, False]) == 0.5
    assert tile_auc([0.5, 0.4], [True, True]) is None


def test_gate_that_selects_the_lesion_tile_covers_it_and_random_gate_does_a_quarter():
    report = _report("a", BOXES, [0.1, 0.2, 0.3, 0.9], [False, False, False, True])
    figures = gate_figures(cases_from_reports([report], [_gt()]), random_repeats=400)
    assert figures["tile_auc"] == 1.0 and figures["tile_auc_central"] == 1.0
    assert figures["selection_ratio"] == 0.25 and (figures["tiles_selected"], figures["lesions_covered"]) == (1, 1)
    assert figures["voxel_coverage"] == 1.0 and figures["lesion_coverage"] == 1.0
    # a random single tile of four holds the lesion one time in four
    assert figures["random_lesion_coverage"] == pytest.approx(0.25, abs=0.07)
    assert figures["oracle_selection_for_target"] == 0.25
    # 27 voxels of 1 mm^3: a small lesion; the size bins count it with the random gate beside it
    small = figures["size_bins"][0]
    assert (small["lesions"], small["covered"]) == (1, 1) and small["random_coverage"] == pytest.approx(0.25, abs=0.07)
    assert figures["size_bins"][1]["lesions"] == figures["size_bins"][2]["lesions"] == 0
    missed = gate_figures(cases_from_reports([_report("a", BOXES, [0.9, 0.2, 0.3, 0.1], [True, False, False, False])],
                                             [_gt()]))
    assert missed["lesion_coverage"] == 0.0 and missed["tile_auc"] == 0.0


def test_central_labels_ignore_slivers_at_inner_edges():
    gt = np.zeros((8, 16, 16), bool)
    gt[2:5, 7:9, 2:4] = True            # straddles y = 8, the border between tiles 0 and 2
    # tiles of 8 along y: tile 0 covers y 0-8 (central region 2-6... but its y=8 face is inner), tile 2 y 8-16
    boxes = np.array([[[0, 8], [0, 8], [0, 8]], [[0, 8], [4, 12], [0, 8]], [[0, 8], [8, 16], [0, 8]]])
    # only the middle tile (y 4-12, central 6-10) holds the lesion centrally; the outer faces are the image border
    assert central_labels(gt, boxes).tolist() == [False, True, False]


def test_random_gate_selecting_everything_covers_everything():
    boxes = np.array(BOXES)
    assert random_gate_coverage(_gt() > 0, boxes, 4, repeats=3) == {"voxel_coverage": 1.0, "lesions_covered": 1.0,
                                                                    "lesions_covered_by_bin": [1.0, 0.0, 0.0]}
    assert random_gate_coverage(_gt() > 0, boxes, 0, repeats=3)["lesions_covered"] == 0.0


def test_from_folders_reads_reports_and_labels(tmp_path):
    (tmp_path / "reports").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "reports" / "a.json").write_text(json.dumps(_report("a", BOXES, [0.1, 0.2, 0.3, 0.9],
                                                                   [False, False, True, True])))
    sitk.WriteImage(sitk.GetImageFromArray(_gt()), str(tmp_path / "labels" / "a.nii.gz"))
    figures = gate_figures_from_folders(tmp_path / "reports", tmp_path / "labels")
    assert figures["selection_ratio"] == 0.5 and figures["lesion_coverage"] == 1.0 and figures["cases"] == 1
    with pytest.raises(FileNotFoundError):
        gate_figures_from_folders(tmp_path / "labels", tmp_path / "labels")


def _block(fallback, floor, grown, by_fallback=0, calibrated=True):
    return {"rule": {"threshold": 1.0}, "calibrated": calibrated, "tiles_by_floor": floor, "fallback": fallback,
            "tiles_by_fallback": by_fallback, "tiles_grown": grown, "baseline_logit": -3.0}


def test_decision_summary_counts_fallbacks_and_added_tiles():
    reports = [{"case": "a", "gate": _block(False, 2, 1)}, {"case": "b", "gate": _block(True, 0, 3, by_fallback=7)},
               {"case": "c", "gate": _block(False, 1, 0, calibrated=False)}, {"case": "d"}]  # d: no gate block
    assert decision_summary(reports) == {"cases": 3, "fallback_cases": 1, "fallback_rate": 1 / 3, "tiles_by_floor": 3,
                                         "tiles_by_fallback": 7, "tiles_grown": 4, "uncalibrated_cases": 1}
    assert decision_summary([{"case": "d"}])["fallback_rate"] is None


def test_from_folders_adds_the_decisions(tmp_path):
    (tmp_path / "reports").mkdir()
    (tmp_path / "labels").mkdir()
    report = {**_report("a", BOXES, [0.1, 0.2, 0.3, 0.9], [False, False, True, True]), "gate": _block(True, 1, 1)}
    (tmp_path / "reports" / "a.json").write_text(json.dumps(report))
    sitk.WriteImage(sitk.GetImageFromArray(_gt()), str(tmp_path / "labels" / "a.nii.gz"))
    decisions = gate_figures_from_folders(tmp_path / "reports", tmp_path / "labels")["decisions"]
    assert (decisions["cases"], decisions["fallback_cases"], decisions["tiles_by_floor"]) == (1, 1, 1)
