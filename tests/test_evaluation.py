import json
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_gfscreen.evaluation.evaluate_folder import evaluate_entry_point, evaluate_folders, write_results
from nnunetv2_gfscreen.evaluation.detection import aggregate_detection, lesion_detection_counts
from nnunetv2_gfscreen.evaluation.metrics import dice, flare_dsc_nsd, normalized_surface_dice
from nnunetv2_gfscreen.evaluation.report_metrics import aggregate_reports, summarize_report, tile_confusion
from nnunetv2_gfscreen.evaluation.tables import format_comparison_table


def _box(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def _line(n, lo, hi):
    """A 1-voxel-thick segment along z in a (n, 3, 3) volume: every voxel is a surface voxel."""
    m = np.zeros((n, 3, 3), bool)
    m[lo:hi, 1, 1] = True
    return m


def _brute_force_nsd(gt, pred, spacing, tol):
    """Reference NSD: surfaces by explicit 6-neighbour checks, all pairwise distances."""
    def surface(m):
        pad = np.pad(m, 1)
        pts = []
        for z, y, x in np.argwhere(m):
            z, y, x = z + 1, y + 1, x + 1
            nbrs = [pad[z - 1, y, x], pad[z + 1, y, x], pad[z, y - 1, x], pad[z, y + 1, x],
                    pad[z, y, x - 1], pad[z, y, x + 1]]
            if not all(nbrs):
                pts.append((z - 1, y - 1, x - 1))
        return np.array(pts, float) * np.array(spacing)

    sg, sp = surface(gt), surface(pred)
    d = np.sqrt(((sg[:, None, :] - sp[None, :, :]) ** 2).sum(-1))
    return ((d.min(1) <= tol).sum() + (d.min(0) <= tol).sum()) / (len(sg) + len(sp))


# ---------------------------------------------------------------- DSC / NSD
def test_dice_hand_values():
    gt = _box((6, 6, 6), (0, 0, 0), (2, 2, 2))  # 8 voxels
    pred = _box((6, 6, 6), (0, 0, 0), (2, 2, 1))  # 4 voxels, all inside gt
    assert dice(gt, pred) == pytest.approx(2 * 4 / 12)
    pred2 = _box((6, 6, 6), (1, 0, 0), (3, 2, 2))  # 8 voxels, 4 shared
    assert dice(gt, pred2) == pytest.approx(0.5)


def test_empty_rules():
    empty = np.zeros((5, 5, 5), bool)
    blob = _box((5, 5, 5), (1, 1, 1), (3, 3, 3))
    assert flare_dsc_nsd(empty, empty, (1, 1, 1)) == (1.0, 1.0)
    assert flare_dsc_nsd(blob, empty, (1, 1, 1)) == (0.0, 0.0)
    assert flare_dsc_nsd(empty, blob, (1, 1, 1)) == (0.0, 0.0)


def test_nsd_identical_and_small_shift():
    gt = _box((12, 12, 12), (3, 3, 3), (8, 8, 8))
    assert normalized_surface_dice(gt, gt, (1, 1, 1)) == 1.0
    shifted = np.roll(gt, 1, axis=2)
    assert normalized_surface_dice(gt, shifted, (1, 1, 1), 2.0) == 1.0
    # the same 1-voxel shift is not within 0.5 mm: the leading / trailing faces fail
    assert normalized_surface_dice(gt, shifted, (1, 1, 1), 0.5) < 1.0


def test_nsd_hand_value_on_segments():
    # gt z 0..9, pred z 5..14 (1 mm): gt voxels z=3..9 are within 2 mm of pred (7 of 10), pred
    # voxels z=5..11 likewise (7 of 10) -> NSD 14/20; DSC 2*5/20 = 0.5
    gt, pred = _line(20, 0, 10), _line(20, 5, 15)
    assert normalized_surface_dice(gt, pred, (1, 1, 1)) == pytest.approx(0.7)
    assert flare_dsc_nsd(gt, pred, (1, 1, 1)) == pytest.approx((0.5, 0.7))


def test_nsd_matches_brute_force_on_shift_by_5():
    gt = _box((10, 12, 16), (2, 2, 2), (8, 9, 10))
    pred = np.roll(gt, 5, axis=2)
    gt[2, 2, 2] = False  # break symmetry a little
    pred[7, 3, 14] = False
    for spacing in [(1, 1, 1), (2.5, 0.8, 0.7)]:
        ref = _brute_force_nsd(gt, pred, spacing, 2.0)
        assert 0 < ref < 1
        assert normalized_surface_dice(gt, pred, spacing, 2.0) == pytest.approx(ref)


def test_nsd_zeroed_below_dsc_threshold():
    gt, pred = _line(30, 0, 10), _line(30, 9, 19)  # overlap 1 voxel -> DSC 0.1
    assert normalized_surface_dice(gt, pred, (1, 1, 1)) > 0
    dsc, nsd = flare_dsc_nsd(gt, pred, (1, 1, 1))
    assert dsc == pytest.approx(0.1)
    assert nsd == 0.0


def test_anisotropic_spacing_matters():
    gt, pred = _line(20, 0, 10), _line(20, 1, 11)
    assert normalized_surface_dice(gt, pred, (1, 1, 1)) == 1.0
    # 3 mm along z > 2 mm: one end voxel of each mask fails -> 18/20
    assert normalized_surface_dice(gt, pred, (3, 1, 1)) == pytest.approx(0.9)
    # a shift along x at 1 mm x-spacing is fine even though z is 3 mm
    box = _box((8, 8, 8), (2, 2, 2), (6, 6, 6))
    assert normalized_surface_dice(box, np.roll(box, 1, axis=2), (3, 1, 1)) == 1.0
    assert normalized_surface_dice(box, np.roll(box, 1, axis=0), (3, 1, 1)) < 1.0


def test_bad_spacing_is_rejected():
    m = _box((4, 4, 4), (1, 1, 1), (3, 3, 3))
    with pytest.raises(ValueError, match="spacing"):
        normalized_surface_dice(m, m, (1, 0, 1))


# ---------------------------------------------------------------- detection
def _two_lesion_case():
    gt = np.zeros((10, 10, 20), bool)
    gt[1:3, 1:3, 1:6] = True  # lesion A
    gt[1:3, 1:3, 10:13] = True  # lesion B
    pred = np.zeros_like(gt)
    pred[2, 2, 2] = True  # touches A
    pred[1, 1, 5] = True  # touches A as a separate component (two voxels away from the first)
    pred[7:9, 7:9, 15:17] = True  # false positive
    return gt, pred


def test_lesion_detection_counts_and_f1():
    gt, pred = _two_lesion_case()
    c = lesion_detection_counts(gt, pred)
    assert c == {"n_lesions": 2, "n_found": 1, "n_pred_components": 3, "n_tp_components": 2,
                 "n_fp_components": 1}
    agg = aggregate_detection([c])
    assert agg["lesion_sensitivity"] == pytest.approx(0.5)
    assert agg["fp_per_case"] == pytest.approx(1.0)
    p, r = 2 / 3, 1 / 2
    assert agg["lesion_precision"] == pytest.approx(p)
    assert agg["lesion_f1"] == pytest.approx(2 * p * r / (p + r))  # 4/7


def test_components_use_26_connectivity():
    gt = np.zeros((4, 4, 4), bool)
    gt[0, 0, 0] = gt[1, 1, 1] = True  # corner-touching: one lesion
    gt[3, 3, 3] = True  # separate lesion
    assert lesion_detection_counts(gt, np.zeros_like(gt))["n_lesions"] == 2


def test_case_level_rates():
    healthy = np.zeros((6, 6, 6), bool)
    lesion = _box((6, 6, 6), (1, 1, 1), (3, 3, 3))
    fp = _box((6, 6, 6), (4, 4, 4), (5, 5, 5))
    cases = [lesion_detection_counts(healthy, fp),  # healthy, FP
             lesion_detection_counts(healthy, healthy),  # healthy, clean
             lesion_detection_counts(lesion, lesion),  # found
             lesion_detection_counts(lesion, fp),  # missed (+1 FP)
             lesion_detection_counts(lesion, lesion | fp)]  # found (+1 FP)
    agg = aggregate_detection(cases)
    assert agg["n_healthy_cases"] == 2 and agg["n_lesion_cases"] == 3
    assert agg["healthy_fp_rate"] == pytest.approx(0.5)
    assert agg["case_sensitivity"] == pytest.approx(2 / 3)
    assert agg["fp_per_case"] == pytest.approx(3 / 5)
    assert agg["lesion_sensitivity"] == pytest.approx(2 / 3)


def test_detection_per_lesion_volume_bin_by_hand():
    """Volumes in mm^3 with the voxel volume (2 mm^3 here): 27 voxels = 54 mm^3 (< 500), 250 voxels = exactly
    500 mm^3 (the 500-5000 bin: bins are closed on the left), 3125 voxels = 6250 mm^3 (>= 5000)."""
    gt = np.zeros((12, 64, 64), bool)
    gt[0:3, 0:3, 0:3] = True          # 27 voxels, found
    gt[0:5, 10:15, 10:20] = True      # 250 voxels, missed
    gt[6:11, 30:55, 30:55] = True     # 3125 voxels, found
    pred = np.zeros_like(gt)
    pred[1, 1, 1] = pred[8, 40, 40] = True
    pred[0, 60, 60] = True            # a false positive
    c = lesion_detection_counts(gt, pred, voxel_volume_mm3=2.0)
    assert (c["n_lesions_lt500"], c["n_found_lt500"]) == (1, 1)
    assert (c["n_lesions_500to5000"], c["n_found_500to5000"]) == (1, 0)
    assert (c["n_lesions_ge5000"], c["n_found_ge5000"]) == (1, 1)
    # at 1 mm^3 per voxel the 250-voxel lesion is small and the 3125-voxel one mid-sized
    c1 = lesion_detection_counts(gt, pred, voxel_volume_mm3=1.0)
    assert (c1["n_lesions_lt500"], c1["n_lesions_500to5000"], c1["n_lesions_ge5000"]) == (2, 1, 0)
    assert "n_lesions_lt500" not in lesion_detection_counts(gt, pred)
    healthy = lesion_detection_counts(np.zeros_like(gt), pred, voxel_volume_mm3=2.0)
    agg = aggregate_detection([c, healthy])
    assert agg["n_lesions_lt500"] == 1 and agg["lesion_sensitivity_lt500"] == 1.0
    assert agg["lesion_sensitivity_500to5000"] == 0.0 and agg["lesion_sensitivity_ge5000"] == 1.0
    assert [(b["key"], b["lesions"], b["found"]) for b in agg["size_bins"]] == \
        [("lt500", 1, 1), ("500to5000", 1, 0), ("ge5000", 1, 1)]
    assert agg["lesion_sensitivity"] == pytest.approx(2 / 3)
    # a case without bin counts (no voxel volume) leaves the bins out rather than pooling part of the cases
    assert "size_bins" not in aggregate_detection([c, lesion_detection_counts(gt, pred)])
    with pytest.raises(ValueError, match="voxel_volume_mm3"):
        lesion_detection_counts(gt, pred, voxel_volume_mm3=0.0)


def test_folder_bins_lesions_by_gt_spacing(tmp_path):
    """A 200-voxel lesion is 600 mm^3 at 1 x 1 x 3 mm (500-5000 bin); a 20-voxel one 60 mm^3, missed."""
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    gt = np.zeros((10, 30, 30), bool)
    gt[0:2, 0:10, 0:10] = True
    gt[5:7, 20:22, 20:25] = True
    pred = np.zeros_like(gt)
    pred[1, 5, 5] = True
    _write(tmp_path / "gt" / "a.nii.gz", gt, (1.0, 1.0, 3.0))
    _write(tmp_path / "pred" / "a.nii.gz", pred, (1.0, 1.0, 3.0))
    res = evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "gt"), None, num_processes=1)
    agg = res["aggregate"]
    assert (agg["n_lesions_lt500"], agg["n_found_lt500"]) == (1, 0)
    assert (agg["n_lesions_500to5000"], agg["n_found_500to5000"]) == (1, 1)
    assert agg["n_lesions_ge5000"] == 0 and agg["lesion_sensitivity_ge5000"] is None
    write_results(res, md_file=str(tmp_path / "r.md"))
    md = (tmp_path / "r.md").read_text()
    assert "## Lesion-level sensitivity by lesion volume" in md
    assert "| <500 mm3 | 1 | 0 | 0.0 |" in md and "| 500-5000 mm3 | 1 | 1 | 100.0 |" in md
    assert "| >=5000 mm3 | 0 | 0 | n/a |" in md


def test_detection_degenerate_cases():
    empty = np.zeros((3, 3, 3), bool)
    agg = aggregate_detection([lesion_detection_counts(empty, empty)])
    assert agg["lesion_sensitivity"] is None and agg["lesion_f1"] is None
    assert agg["healthy_fp_rate"] == 0.0 and agg["case_sensitivity"] is None


# ---------------------------------------------------------------- reports
def _hand_report(case="c1"):
    return {"case": case, "tiles_total": 4, "tiles_selected": 2, "selection_ratio": 0.5,
            "glance_seconds": 0.1, "focus_seconds": 1.0, "total_seconds": 2.0,
            "tiles": [{"bbox_original": [[0, 4], [0, 4], [0, 4]], "score": 0.9, "selected": True},
                      {"bbox_original": [[0, 4], [0, 4], [4, 8]], "score": 0.2, "selected": False},
                      {"bbox_original": [[0, 4], [4, 8], [0, 8]], "score": 0.1, "selected": False},
                      {"bbox_original": [[4, 8], [0, 8], [0, 8]], "score": 0.7, "selected": True}]}


def test_tile_confusion_from_hand_report():
    gt = np.zeros((8, 8, 8), bool)
    gt[1, 1, 1] = True  # in tile 0 (selected) -> TP
    gt[2, 2, 4] = True  # in tile 1 only (half-open: x=4 is not in tile 0) -> FN
    # tile 2: negative, rejected -> TN; tile 3: negative, selected -> FP
    report = _hand_report()
    assert tile_confusion(gt, report["tiles"]) == {"tile_tp": 1, "tile_fn": 1, "tile_fp": 1, "tile_tn": 1}
    s1 = summarize_report(report, gt, "c1")
    gt2 = np.zeros_like(gt)
    gt2[6, 6, 6] = True  # only in tile 3 (selected) -> TP; the rest are negative
    report2 = _hand_report("c2")
    del report2["focus_seconds"]
    s2 = summarize_report(report2, gt2, "c2")
    agg = aggregate_reports([s1, s2])
    assert agg["tile_sensitivity"] == pytest.approx(2 / 3)  # TP 2, FN 1
    assert agg["tile_specificity"] == pytest.approx(3 / 5)  # TN 1+2, FP 1+1
    assert agg["focus_seconds_mean"] == pytest.approx(1.0)  # only c1 has it
    assert agg["selection_ratio_mean"] == pytest.approx(0.5)


def test_report_missing_keys_are_omitted():
    agg = aggregate_reports([summarize_report({"case": "a", "total_seconds": 3.0},
                                              np.zeros((2, 2, 2), bool), "a")])
    assert agg == {"n_reports": 1, "total_seconds_mean": 3.0}


def test_report_errors():
    gt = np.zeros((8, 8, 8), bool)
    bad = {"tiles": [{"bbox_original": [[0, 9], [0, 4], [0, 4]], "selected": True}]}
    with pytest.raises(ValueError, match=r"c1.*\[\[0, 9\]"):
        summarize_report(bad, gt, "c1")
    with pytest.raises(ValueError, match="belongs to case"):
        summarize_report({"case": "other"}, gt, "c1")


# ---------------------------------------------------------------- tables
def test_format_comparison_table():
    dense = {"dsc_mean": 0.5, "nsd_mean": 0.25, "lesion_sensitivity": 0.8, "fp_per_case": 1.5,
             "healthy_fp_rate": 0.3, "total_seconds_mean": 10.0}
    gated = {"aggregate": {**dense, "dsc_mean": 0.6, "selection_ratio_mean": 0.167,
                           "total_seconds_mean": 2.5}}
    lines = format_comparison_table({"dense": dense, "gated": gated}).strip().splitlines()
    assert len(lines) == 4
    assert lines[0].count("|") == 9  # run + 7 columns
    assert lines[2] == "| dense | 50.0 | 25.0 | 80.0 | 1.50 | 30.0 | n/a | 10.00 |"
    assert lines[3] == "| gated | 60.0 | 25.0 | 80.0 | 1.50 | 30.0 | 16.7 | 2.50 |"


# ---------------------------------------------------------------- folder + CLI
def _write(path, array, spacing_xyz):
    img = sitk.GetImageFromArray(array.astype(np.uint8))
    img.SetSpacing(spacing_xyz)
    sitk.WriteImage(img, str(path))


@pytest.fixture
def folders(tmp_path):
    gt_dir, pred_dir, rep_dir = tmp_path / "gt", tmp_path / "pred", tmp_path / "reports"
    for d in (gt_dir, pred_dir, rep_dir):
        d.mkdir()
    sp = (1.0, 1.0, 3.0)  # x, y, z: z is 3 mm
    # a: z-segment shifted by one slice -> DSC 0.9, NSD 0.9 (3 mm > 2 mm); wrong axis order gives 1.0
    _write(gt_dir / "a.nii.gz", _line(20, 0, 10), sp)
    _write(pred_dir / "a.nii.gz", _line(20, 1, 11), sp)
    # b: healthy, one FP voxel -> DSC 0, NSD 0
    empty = np.zeros((20, 3, 3), bool)
    fp = empty.copy()
    fp[15, 0, 0] = True
    _write(gt_dir / "b.nii.gz", empty, sp)
    _write(pred_dir / "b.nii.gz", fp, sp)
    # c: healthy and clean -> 1, 1
    _write(gt_dir / "c.nii.gz", empty, sp)
    _write(pred_dir / "c.nii.gz", empty, sp)
    _write(pred_dir / "extra.nii.gz", empty, sp)  # ignored
    rep = {"case": "a", "selection_ratio": 0.5, "total_seconds": 4.0,
           "tiles": [{"bbox_original": [[0, 10], [0, 3], [0, 3]], "selected": True},
                     {"bbox_original": [[10, 20], [0, 3], [0, 3]], "selected": True}]}
    (rep_dir / "a.json").write_text(json.dumps(rep))
    (rep_dir / "b.json").write_text(json.dumps({**rep, "case": "b", "total_seconds": 2.0}))
    return tmp_path


def test_cli_end_to_end(folders, monkeypatch):
    out_json, out_md = folders / "res" / "results.json", folders / "results.md"
    monkeypatch.setattr(sys, "argv", ["nnUNetv2_gfscreen_evaluate", "-pred", str(folders / "pred"),
                                      "-gt", str(folders / "gt"), "-reports", str(folders / "reports"),
                                      "-o", str(out_json), "--md", str(out_md), "-np", "1"])
    evaluate_entry_point()
    res = json.loads(out_json.read_text())
    per = {c["case"]: c for c in res["per_case"]}
    assert sorted(per) == ["a", "b", "c"]
    assert per["a"]["dsc"] == pytest.approx(0.9) and per["a"]["nsd"] == pytest.approx(0.9)
    assert (per["b"]["dsc"], per["b"]["nsd"]) == (0.0, 0.0)
    assert (per["c"]["dsc"], per["c"]["nsd"]) == (1.0, 1.0)
    agg = res["aggregate"]
    assert agg["dsc_mean"] == pytest.approx(1.9 / 3) and agg["nsd_mean"] == pytest.approx(1.9 / 3)
    assert agg["lesion_sensitivity"] == 1.0 and agg["fp_per_case"] == pytest.approx(1 / 3)
    assert agg["healthy_fp_rate"] == pytest.approx(0.5) and agg["case_sensitivity"] == 1.0
    assert agg["n_reports"] == 2 and agg["total_seconds_mean"] == pytest.approx(3.0)
    # case a: tile 0 positive+selected (TP), tile 1 negative+selected (FP); case b: 2 FP
    assert agg["tile_sensitivity"] == 1.0 and agg["tile_specificity"] == 0.0
    assert per["a"]["tile_tp"] == 1 and "tile_tp" not in per["c"]
    md = out_md.read_text()
    assert "## Aggregate" in md and "| 63.3 |" in md  # DSC % mean
    assert "| a | 90.0 | 90.0 | 1 | 1 | 0 |" in md


def test_multiprocessing_matches_single_process(folders):
    one = evaluate_folders(str(folders / "pred"), str(folders / "gt"), None, num_processes=1)
    two = evaluate_folders(str(folders / "pred"), str(folders / "gt"), None, num_processes=2)
    assert one["per_case"] == two["per_case"] and one["aggregate"] == two["aggregate"]
    assert "n_reports" not in one["aggregate"]


def test_folder_errors(folders, tmp_path):
    gt, pred = str(folders / "gt"), str(folders / "pred")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_folders(str(tmp_path / "nope"), gt, num_processes=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        evaluate_folders(str(tmp_path / "empty"), gt, num_processes=1)
    (folders / "pred" / "b.nii.gz").unlink()
    (folders / "pred" / "c.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="b, c"):
        evaluate_folders(pred, gt, num_processes=1)


@pytest.mark.parametrize("kind,match", [("shape", "case a: prediction shape"),
                                         ("spacing", "case a: prediction spacing"),
                                         ("labels", r"case a: prediction .* labels \[2\]")])
def test_case_errors(folders, kind, match):
    arr = _line(20, 1, 11)
    if kind == "shape":
        _write(folders / "pred" / "a.nii.gz", arr[:19], (1.0, 1.0, 3.0))
    elif kind == "spacing":
        _write(folders / "pred" / "a.nii.gz", arr, (1.0, 1.0, 2.0))
    else:
        _write(folders / "pred" / "a.nii.gz", arr.astype(np.uint8) * 2, (1.0, 1.0, 3.0))
    with pytest.raises(ValueError, match=match):
        evaluate_folders(str(folders / "pred"), str(folders / "gt"), num_processes=1)


def test_nsd_crop_is_exact_near_and_away_from_borders():
    rng = np.random.default_rng(0)
    for lo in [(0, 0, 0), (3, 4, 5)]:
        gt = np.zeros((14, 15, 16), bool)
        pred = np.zeros_like(gt)
        gt[lo[0]:lo[0] + 6, lo[1]:lo[1] + 7, lo[2]:lo[2] + 5] = rng.random((6, 7, 5)) > 0.3
        pred[lo[0] + 1:lo[0] + 7, lo[1]:lo[1] + 7, lo[2] + 2:lo[2] + 7] = rng.random((6, 7, 5)) > 0.3
        pred[13, 14, 15] = pred[0, 14, 15] = True  # far-away false positives
        gt[13, 0, 15] = True  # and a far-away missed lesion
        for spacing in [(2.0, 0.9, 0.8), (1.0, 1.0, 1.0)]:
            ref = _brute_force_nsd(gt, pred, spacing, 2.0)
            assert normalized_surface_dice(gt, pred, spacing, 2.0) == pytest.approx(ref)


# ---------------------------------------------------------------- figures (--png)
def test_cli_png_writes_one_figure_per_case(folders, monkeypatch):
    from matplotlib import image as mimage

    img_dir = folders / "img"
    img_dir.mkdir()
    for case in ("a", "b", "c"):
        ct = np.full((20, 3, 3), -1000, np.int16)
        ct[:, 1, :] = 40
        img = sitk.GetImageFromArray(ct)
        img.SetSpacing((1.0, 1.0, 3.0))
        sitk.WriteImage(img, str(img_dir / f"{case}_0000.nii.gz"))
    out_json = folders / "res" / "results.json"
    argv = ["nnUNetv2_gfscreen_evaluate", "-pred", str(folders / "pred"), "-gt", str(folders / "gt"),
            "-reports", str(folders / "reports"), "-o", str(out_json), "-np", "1"]
    monkeypatch.setattr(sys, "argv", argv + ["--png"])
    with pytest.raises(SystemExit):  # --png needs -img
        evaluate_entry_point()
    monkeypatch.setattr(sys, "argv", argv + ["--png", "-img", str(img_dir)])
    evaluate_entry_point()
    figures = folders / "res" / "figures"  # default: next to -o
    assert sorted(p.name for p in figures.iterdir()) == ["a.png", "b.png", "c.png"]  # c has no report
    for p in figures.iterdir():
        rgb = mimage.imread(str(p))
        assert rgb.shape[0] > 200 and rgb.shape[1] > 600
    res = json.loads(out_json.read_text())
    assert res["settings"]["png_dir"] == str(figures) and res["per_case"][0]["dsc"] == pytest.approx(0.9)
    # an explicit folder and projections; a missing image is named
    evaluate_folders(str(folders / "pred"), str(folders / "gt"), None, num_processes=1,
                     image_folder=str(img_dir), png_dir=str(folders / "figs"), png_views="mip")
    assert (folders / "figs" / "a.png").is_file()
    (img_dir / "b_0000.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="no image.*: b"):
        evaluate_folders(str(folders / "pred"), str(folders / "gt"), None, num_processes=1,
                         image_folder=str(img_dir), png_dir=str(folders / "figs"), png_views="mip")
