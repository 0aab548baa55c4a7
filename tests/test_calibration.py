"""Gate calibration: the record, the honest leave-one-case-out rules, pooled folds, `-f all`, and the round trip
through a model folder (one record in the checkpoint; the JSON a copy)."""
import json
import sys

import numpy as np
import pytest
import torch

from nnunetv2_gfscreen.core.calibration import (CalibrationSettings, calibration_record, fit_rule, refit_rule,
                                                score_cases)
from nnunetv2_gfscreen.core.calibration_store import CALIBRATION_FILE, CHECKPOINT_KEY, load_calibration
from nnunetv2_gfscreen.core.coverage import CaseCoverage, operating_curve, threshold_for_target
from nnunetv2_gfscreen.core.gate import Gate, GateRule
from nnunetv2_gfscreen.core.tiles import sliding_window_slicers
from nnunetv2_gfscreen.predictors.calibrate_cli import calibrate_entry_point, validation_keys
from nnunetv2_gfscreen.trainers.final_validation import case_rules
from tests.toy_models import toy_image, toy_network

SETTINGS = CalibrationSettings(target=1.0, tile_margin=0.0, floor=0.0, fallback_tolerance=5.0)
PATCH = (8, 16, 16)


def _tiles_only(scores, labels):
    scores = np.asarray(scores, np.float64)
    e = np.zeros(0, np.float64)
    return CaseCoverage(scores, np.asarray(labels), e, np.zeros(0, np.int64), e, np.zeros(0, np.int64))


def test_tile_columns_by_hand():
    t = operating_curve([_tiles_only([0.9, 0.8, 0.8, 0.3, 0.1], [True, False, True, True, False])])
    np.testing.assert_allclose(t["threshold"], [0.05, 0.2, 0.55, 0.85, 0.9], rtol=1e-6)
    np.testing.assert_allclose(t["tile_sensitivity"], [1, 1, 2 / 3, 1 / 3, 0])
    np.testing.assert_allclose(t["selection_ratio"], [1, 0.8, 0.6, 0.2, 0])
    np.testing.assert_allclose(t["tile_specificity"], [0, 0.5, 0.5, 1, 1])
    assert t["lesion_sensitivity"] == [None] * 5 and t["voxel_coverage"] == [None] * 5
    assert threshold_for_target(t, 1.0, "tile_sensitivity") == pytest.approx(0.2)


def _covered_share(scores, slicers, lesion, threshold):
    """Brute force: share of lesion voxels inside the union of the tiles with score > threshold."""
    union = np.zeros(lesion.shape, bool)
    for s, score in zip(slicers, scores):
        if score > threshold:
            union[s[1:]] = True
    return union[lesion].mean()


def _toy_cases(n=3):
    """n toy cases with one lesion each inside a bright block (the mean-intensity Glance finds its tiles)."""
    cases = []
    for i in range(n):
        img = toy_image((16, 40, 40), (slice(0, 6), slice(0, 14), slice(24, 40)), seed=i + 1)
        img += 0.3 * i  # the cases differ in brightness, so their scores do
        seg = np.zeros((1, 16, 40, 40), np.uint8)
        seg[0, 2:4, 5:8, 30:33] = 1
        cases.append((img, seg))
    return cases


def test_record_of_a_toy_network():
    net = toy_network(offset=0.5)
    cases = _toy_cases(3)
    scored = score_cases(net, cases, PATCH, SETTINGS, case_ids=["a", "b", "c"], voxel_volume=2.0)
    record = calibration_record(scored, SETTINGS, "toy", PATCH, 0.5)
    rule = GateRule.from_dict(record["rule"])
    assert record["calibrated"] and rule.calibrated and record["n_lesions"] == 3 and record["tiles_total"] == 3 * 48
    assert record["point"]["lesion_sensitivity"] == 1.0
    # the highest threshold covering every lesion (3 cases cannot certify 1.0), lowered by the LOCO margin
    assert not record["fit"]["target_certifiable"] and record["fit"]["threshold_in_sample"] >= rule.threshold
    slicers = sliding_window_slicers((16, 40, 40), PATCH, 0.5)
    for s, (img, seg) in zip(scored, cases):
        assert _covered_share(s.coverage.tile_scores, slicers, seg[0] > 0, rule.threshold) >= 0.9
    cert = record["certified"]
    assert cert["lesions_covered"] == 3 and cert["expected_sensitivity_certified"] == pytest.approx(0.75)
    assert cert["size_bins"][0]["lesions"] == 3  # 18 voxels of 2 mm^3: small
    # leave one case out: each case's rule is the one fitted on the other two, by the same procedure
    for i, name in enumerate("abc"):
        others = [s.coverage for j, s in enumerate(scored) if j != i]
        assert record["loco"]["rules"][name] == fit_rule(others, SETTINGS)[0].to_dict()
    assert case_rules(record)("b") == GateRule.from_dict(record["loco"]["rules"]["b"])
    assert case_rules(record)("unknown") == rule
    # the envelope is the range of the cases' median logits, widened by the range and the tolerance
    medians = [s.coverage.statistic for s in scored]
    width = max(medians) - min(medians) + 5.0
    assert rule.envelope == pytest.approx((min(medians) - width, max(medians) + width))
    # refitting at the stored target gives the stored rule (one rule everywhere)
    assert refit_rule(record, target=1.0)[0] == rule
    budget_rule, _, bound = refit_rule(record, max_selection=record["point"]["selection_ratio"] / 2)
    assert bound == "selection budget" and budget_rule.threshold > rule.threshold
    # no lesion: an uncalibrated record, which refuses to refit
    healthy = calibration_record(score_cases(net, [(cases[0][0], np.zeros_like(cases[0][1]))], PATCH, SETTINGS),
                                 SETTINGS, "toy", PATCH, 0.5)
    assert not healthy["calibrated"] and "no lesion" in healthy["reason"]
    assert GateRule.from_dict(healthy["rule"]) == GateRule()
    with pytest.raises(ValueError, match="not calibrated"):
        refit_rule(healthy, target=0.9)


def test_floor_and_threshold_only_certificates():
    net = toy_network(offset=0.5)
    floored = CalibrationSettings(target=1.0, tile_margin=0.0, floor=0.1, fallback_tolerance=float("inf"))
    scored = score_cases(net, _toy_cases(2), PATCH, floored)
    record = calibration_record(scored, floored, "toy", PATCH, 0.5)
    assert record["rule"]["floor"] == 0.1 and record["rule"]["envelope"] is None
    # the floor's tiles are selected at any threshold: at least ceil(0.1 * 48) = 5 per case
    assert record["point"]["selection_ratio"] >= 10 / 96
    assert record["certified"]["lesions_covered"] >= record["certified_threshold_only"]["lesions_covered"]


def test_validation_keys_must_be_disjoint():
    splits = [{"train": ["b"], "val": ["a"]}, {"train": ["a"], "val": ["b"]}, {"train": [], "val": ["a"]}]
    assert validation_keys(splits, [0, 1], "s") == {0: ["a"], 1: ["b"]}
    with pytest.raises(ValueError, match="folds 0 and 2"):
        validation_keys(splits, [0, 2], "s")
    with pytest.raises(ValueError, match="fold 5"):
        validation_keys(splits, [5], "s")


# ---------------------------------------------------------------------- through a model folder and the CLI
def _splits(planned_dataset):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from tests.nnunet_fixtures import CONFIG

    base = planned_dataset["dataset_folder"]
    pm = PlansManager(json.loads(planned_dataset["plans_file"].read_text()))
    data_folder = base / pm.get_configuration(CONFIG).data_identifier
    dataset_class = infer_dataset_class(str(data_folder))
    splits_file = base / "splits_final.json"
    if not splits_file.is_file():  # the split nnU-Net's trainer would create
        ids = sorted(dataset_class.get_identifiers(str(data_folder)))
        splits_file.write_text(json.dumps(generate_crossval_split(ids, seed=12345, n_splits=5)))
    return json.loads(splits_file.read_text()), data_folder, dataset_class, pm


def _calibrate(monkeypatch, *args):
    from tests.nnunet_fixtures import CONFIG, DATASET_ID
    monkeypatch.setattr(sys, "argv", ["prog", "-d", str(DATASET_ID), "-c", CONFIG, "-device", "cpu", *args])
    calibrate_entry_point()


def test_calibration_round_trip(planned_dataset, tmp_path, monkeypatch, capsys):
    from nnunetv2_gfscreen.predictors.cli import rules_from_calibration, run_predict_gfscreen
    from nnunetv2_gfscreen.trainers.GFScreenTrainer import GFScreenTrainer
    from tests.nnunet_fixtures import CONFIG, DATASET_ID
    from tests.toy_models import make_model_folder, patch_nnunet_paths

    patch_nnunet_paths(monkeypatch, planned_dataset["root"])
    trainer = "GFScreenTrainer_NoAlphaCE"  # same network; a model folder of its own
    model_folder, _ = make_model_folder(planned_dataset, trainer, seed=3)
    fold = model_folder / "fold_0"
    splits, data_folder, dataset_class, pm = _splits(planned_dataset)
    val_keys = splits[0]["val"]

    _calibrate(monkeypatch, "-tr", trainer, "-f", "0", "--target_sensitivity", "0.98", "--tile_margin", "0.1")
    printed = capsys.readouterr().out
    assert "certified" in printed and "Leave-one-case-out" in printed
    stored = json.loads((fold / CALIBRATION_FILE).read_text())["checkpoints"]["checkpoint_final.pth"]
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    record = load_calibration(str(fold))
    assert ckpt[CHECKPOINT_KEY] == stored == record  # the JSON is a copy of the checkpoint's record
    assert record["n_cases"] == len(val_keys) and record["settings"]["target_lesion_sensitivity"] == 0.98
    assert record["settings"]["tile_margin"] == 0.1 and record["tile_step_size"] == 0.5
    assert set(record["case_ids"]) == set(val_keys) and record["source"] == "validation cases of fold 0"
    rule = GateRule.from_dict(record["rule"])
    # the rule is in network_weights (what the stock predictor reads) and loads strictly
    assert Gate.rule_from_state_dict(ckpt["network_weights"]) == rule
    net = GFScreenTrainer.build_network_architecture(pm, pm.get_configuration(CONFIG), 1, 2, False)
    net.load_state_dict(ckpt["network_weights"], strict=True)
    assert net.gate.rule == rule
    # ... and covers the calibration lesions, scored again from the reloaded weights
    ds = dataset_class(str(data_folder), list(val_keys))
    cases = [(torch.from_numpy(np.asarray(d[:], np.float32)), np.asarray(s[:]))
             for d, s, _, _ in (ds.load_case(k) for k in ds.identifiers)]
    settings = CalibrationSettings(0.98, 0.1, record["settings"]["floor"], 5.0)
    rescored = [s.coverage for s in score_cases(net.eval(), cases, pm.get_configuration(CONFIG).patch_size, settings)]
    assert sum(c.n_lesions for c in rescored) == record["n_lesions"] > 0
    assert operating_curve(rescored, [rule.threshold])["lesion_sensitivity"][0] >= \
        record["point"]["lesion_sensitivity"] - 1e-12

    # --max_selection and both constraints refit from the stored cases
    budget = record["point"]["selection_ratio"] / 2
    (r_budget,) = rules_from_calibration(str(model_folder), [0], "checkpoint_final.pth", max_selection=budget)
    assert r_budget.threshold > rule.threshold and r_budget.floor == rule.floor
    (r_both,) = rules_from_calibration(str(model_folder), [0], "checkpoint_final.pth", 0.98, budget)
    assert r_both.threshold == r_budget.threshold and "selection budget" in capsys.readouterr().out
    # restating the stored target gives the stored threshold
    (r_same,) = rules_from_calibration(str(model_folder), [0], "checkpoint_final.pth", 0.98)
    assert r_same == rule

    # the predict CLI gates at the refitted rule
    image = sorted((planned_dataset["raw_folder"] / "imagesTs").glob("*_0000.nii.gz"))[0]
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / image.name).write_bytes(image.read_bytes())
    out = tmp_path / "out"
    reports = run_predict_gfscreen(["-i", str(inputs), "-o", str(out), "-d", str(DATASET_ID), "-c", CONFIG,
                                    "-tr", trainer, "-f", "0", "-device", "cpu", "--disable_tta",
                                    "--target_sensitivity", "0.5"])
    (r_half,) = rules_from_calibration(str(model_folder), [0], "checkpoint_final.pth", 0.5)
    assert reports[0]["threshold"] == pytest.approx(r_half.threshold, abs=1e-9)
    assert reports[0]["gate"]["calibrated"] and reports[0]["gate"]["rule"]["floor"] == rule.floor
    # the report says what the calibration certifies
    cal = reports[0]["gate"]["calibration"]
    assert cal["calibrated"] and cal["expected_sensitivity_certified"] == \
        pytest.approx(record["certified"]["expected_sensitivity_certified"]) and "certified" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--threshold"):
        run_predict_gfscreen(["-i", str(inputs), "-o", str(out), "-d", str(DATASET_ID), "-c", CONFIG, "-tr", trainer,
                              "-f", "0", "-device", "cpu", "--threshold", "0.5", "--max_selection", "0.2"])


def test_pooled_folds_score_each_case_with_the_fold_that_did_not_train_on_it(planned_dataset, monkeypatch):
    from nnunetv2_gfscreen.core.calibration import preprocessed_cases
    from tests.nnunet_fixtures import CONFIG
    from tests.toy_models import make_model_folder, patch_nnunet_paths

    patch_nnunet_paths(monkeypatch, planned_dataset["root"])
    trainer = "GFScreenTrainer_Group4"  # a model folder of its own
    splits, data_folder, dataset_class, pm = _splits(planned_dataset)
    nets = {f: make_model_folder(planned_dataset, trainer, seed=20 + f, fold=f)[1] for f in (0, 1)}
    model_folder = make_model_folder(planned_dataset, trainer, seed=20, fold=0)[0]
    _calibrate(monkeypatch, "-tr", trainer, "-f", "0", "1", "--floor", "0")
    record = load_calibration(str(model_folder / "fold_0"))
    assert record == load_calibration(str(model_folder / "fold_1"))  # the pooled record in each fold
    assert record["source"].startswith("pooled validation cases of folds 0 1")
    assert record["case_ids"] == splits[0]["val"] + splits[1]["val"]
    settings = CalibrationSettings(0.98, 0.25, 0.0, 5.0)
    for f in (0, 1):
        ds = dataset_class(str(data_folder), splits[f]["val"])
        own = score_cases(nets[f].eval(), preprocessed_cases(ds, list(ds.identifiers)),
                          pm.get_configuration(CONFIG).patch_size, settings)
        other = score_cases(nets[1 - f].eval(), preprocessed_cases(ds, list(ds.identifiers)),
                            pm.get_configuration(CONFIG).patch_size, settings)
        for case_id, s_own, s_other in zip(ds.identifiers, own, other):
            stored = next(c for c in record["cases"] if c["case"] == case_id)
            np.testing.assert_allclose(stored["tile_scores"], s_own.coverage.tile_scores, rtol=1e-6, atol=1e-6)
            assert not np.allclose(stored["tile_scores"], s_other.coverage.tile_scores)
    rules = [Gate.rule_from_state_dict(torch.load(model_folder / f"fold_{f}" / "checkpoint_final.pth",
                                                  weights_only=False)["network_weights"]) for f in (0, 1)]
    assert rules[0] == rules[1] == GateRule.from_dict(record["rule"])


def test_fold_all_is_never_calibrated_on_its_training_cases(planned_dataset, monkeypatch):
    from tests.toy_models import make_model_folder, patch_nnunet_paths

    patch_nnunet_paths(monkeypatch, planned_dataset["root"])
    trainer = "GFScreenTrainer_DiceReward"
    model_folder, _ = make_model_folder(planned_dataset, trainer, seed=7, fold="all")
    with pytest.raises(ValueError, match="never saw"):
        _calibrate(monkeypatch, "-tr", trainer, "-f", "all")
    raw = planned_dataset["raw_folder"]
    with pytest.raises(ValueError, match="trained on"):
        _calibrate(monkeypatch, "-tr", trainer, "-f", "all", "-cal_images", str(raw / "imagesTr"),
                   "-cal_labels", str(raw / "labelsTr"))
    _calibrate(monkeypatch, "-tr", trainer, "-f", "all", "-cal_images", str(raw / "imagesTs"),
               "-cal_labels", str(raw / "labelsTs"))
    record = load_calibration(str(model_folder / "fold_all"))
    assert record["source"].startswith("named calibration cases")
    assert set(record["case_ids"]) == {p.name[:-len("_0000.nii.gz")] for p in (raw / "imagesTs").glob("*.nii.gz")}


def test_folds_trained_differently_are_refused(planned_dataset, monkeypatch):
    import json as _json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2_gfscreen.trainers.GFScreenTrainer import GFScreenTrainer
    from tests.nnunet_fixtures import CONFIG
    from tests.toy_models import make_model_folder, patch_nnunet_paths

    patch_nnunet_paths(monkeypatch, planned_dataset["root"])
    trainer = "GFScreenTrainer_NoDenseMap"  # a model folder of its own
    _splits(planned_dataset)
    model_folder, _ = make_model_folder(planned_dataset, trainer, seed=30, fold=0)
    make_model_folder(planned_dataset, trainer, seed=31, fold=1)
    # fold 1 trained with another Glance width (its plans' gfscreen block differed at the time)
    plans = _json.loads(planned_dataset["plans_file"].read_text())
    plans["configurations"][CONFIG].setdefault("gfscreen", {})["glance_base_features"] = 3
    pm = PlansManager(plans)
    other = GFScreenTrainer.build_network_architecture(pm, pm.get_configuration(CONFIG), 1, 2, False)
    ckpt_file = model_folder / "fold_1" / "checkpoint_final.pth"
    ckpt = torch.load(ckpt_file, weights_only=False)
    ckpt["network_weights"] = other.state_dict()
    torch.save(ckpt, ckpt_file)
    for folds in (["0", "1"], ["1"]):
        with pytest.raises(ValueError, match="fold 1's checkpoint does not fit the network"):
            _calibrate(monkeypatch, "-tr", trainer, "-f", *folds)
