"""Gate threshold calibration: the table, the choice, and the round trip through a model folder."""
import json
import sys

import numpy as np
import pytest
import torch

from nnunetv2_gfscreen.predictors.calibration import (CALIBRATION_FILE, calibrate_entry_point, calibrate_threshold,
                                                      load_calibration, score_and_label_tiles, threshold_for_sensitivity,
                                                      threshold_table)
from tests.toy_models import toy_image, toy_network


def test_table_by_hand():
    scores = np.array([0.9, 0.8, 0.8, 0.3, 0.1], np.float32)
    labels = np.array([True, False, True, True, False])
    t = threshold_table(scores, labels)
    # candidates: below 0.1, between distinct scores, at the top
    np.testing.assert_allclose(t["threshold"], [0.05, 0.2, 0.55, 0.85, 0.9], rtol=1e-6)
    np.testing.assert_allclose(t["tile_sensitivity"], [1, 1, 2 / 3, 1 / 3, 0])
    np.testing.assert_allclose(t["selection_ratio"], [1, 0.8, 0.6, 0.2, 0])
    np.testing.assert_allclose(t["tile_specificity"], [0, 0.5, 0.5, 1, 1])
    assert threshold_for_sensitivity(t, 1.0) == pytest.approx(0.2)
    assert threshold_for_sensitivity(t, 0.6) == pytest.approx(0.55)
    with pytest.raises(ValueError, match="target_sensitivity"):
        threshold_for_sensitivity(t, 0.0)


def test_table_monotone_and_target_met_on_random_scores():
    rng = np.random.default_rng(0)
    labels = rng.random(500) < 0.1
    scores = np.clip(rng.normal(0.3 + 0.4 * labels, 0.2), 0, 1).astype(np.float32)
    scores[:20] = scores[20]  # ties
    t = threshold_table(scores, labels)
    for key in ("tile_sensitivity", "selection_ratio"):
        assert np.all(np.diff(t[key]) <= 0), key
    assert np.all(np.diff(t["threshold"]) > 0)
    for target in (0.5, 0.9, 0.98, 1.0):
        thr = np.float32(threshold_for_sensitivity(t, target))
        assert (scores[labels] > thr).mean() >= target
        # no larger candidate threshold still meets the target
        larger = [c for c in t["threshold"] if c > thr]
        assert all((scores[labels] > np.float32(c)).mean() < target for c in larger)


def test_calibrate_toy_network_and_no_positive_case():
    net = toy_network(offset=0.5, threshold=0.5)
    img = toy_image((16, 40, 40), (slice(0, 6), slice(0, 14), slice(24, 40)), seed=1)
    seg = np.zeros((1, 16, 40, 40), np.uint8)
    seg[0, 2:4, 5:8, 30:33] = 1  # lesion inside the bright block
    result = calibrate_threshold(net, [(img, seg)], 1.0, patch_size=(8, 16, 16))
    scores, labels, _ = score_and_label_tiles(net, [(img, seg)], (8, 16, 16))
    assert result["tiles_total"] == 48 and result["tiles_positive"] == int(labels.sum()) > 0
    assert result["tile_sensitivity"] == 1.0
    assert result["threshold"] < scores[labels].min()
    assert result["threshold"] > scores[scores < scores[labels].min()].max()
    assert float(net.threshold) == 0.5  # calibration does not modify the network
    healthy = calibrate_threshold(net, [(img, np.zeros_like(seg))], 0.98, patch_size=(8, 16, 16))
    assert healthy["threshold"] == 0.5 and "no positive tiles" in healthy["note"]
    assert healthy["tile_sensitivity"] is None


# ---------------------------------------------------------------------- round trip through a model folder
def test_calibration_round_trip(planned_dataset, tmp_path, monkeypatch):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2_gfscreen.predictors.cli import run_predict_gfscreen
    from nnunetv2_gfscreen.trainers.GFScreenTrainer import GFScreenTrainer
    from tests.nnunet_fixtures import CONFIG, DATASET_ID
    from tests.toy_models import make_model_folder, patch_nnunet_paths

    patch_nnunet_paths(monkeypatch, planned_dataset["root"])
    trainer = "GFScreenTrainer_NoAlphaCE"  # same network; a model folder of its own
    model_folder, _ = make_model_folder(planned_dataset, trainer, seed=3)
    base = planned_dataset["dataset_folder"]
    plans = json.loads((model_folder / "plans.json").read_text())
    pm = PlansManager(plans)
    data_folder = base / pm.get_configuration(CONFIG).data_identifier
    dataset_class = infer_dataset_class(str(data_folder))
    splits_file = base / "splits_final.json"
    if not splits_file.is_file():  # the split nnU-Net's trainer would create
        ids = sorted(dataset_class.get_identifiers(str(data_folder)))
        splits_file.write_text(json.dumps(generate_crossval_split(ids, seed=12345, n_splits=5)))
    val_keys = json.loads(splits_file.read_text())[0]["val"]

    args = ["prog", "-d", str(DATASET_ID), "-c", CONFIG, "-tr", trainer, "-f", "0", "-device", "cpu"]
    monkeypatch.setattr(sys, "argv", args + ["--target_sensitivity", "0.98"])
    calibrate_entry_point()
    stored = json.loads((model_folder / "fold_0" / CALIBRATION_FILE).read_text())
    result = load_calibration(str(model_folder / "fold_0"))
    assert stored["checkpoints"]["checkpoint_final.pth"] == result
    assert result["n_cases"] == len(val_keys) and result["target_sensitivity"] == 0.98
    table = result["table"]
    for key in ("tile_sensitivity", "selection_ratio"):
        assert np.all(np.diff(table[key]) <= 0), key

    # the checkpoint loads strictly into a fresh network and carries the chosen threshold
    ckpt = torch.load(model_folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    net = GFScreenTrainer.build_network_architecture(pm, pm.get_configuration(CONFIG), 1, 2, False)
    net.load_state_dict(ckpt["network_weights"], strict=True)
    assert float(net.threshold) == pytest.approx(result["threshold"], abs=1e-7)
    # ... and meets the target on the calibration tiles, scored again from the reloaded weights
    ds = dataset_class(str(data_folder), list(val_keys))
    cases = [(torch.from_numpy(np.asarray(d[:], np.float32)), np.asarray(s[:]))
             for d, s, _, _ in (ds.load_case(k) for k in ds.identifiers)]
    scores, labels, _ = score_and_label_tiles(net.eval(), cases, pm.get_configuration(CONFIG).patch_size)
    assert labels.any()
    assert (scores[labels] > net.threshold.numpy()).mean() >= 0.98

    # the predict CLI picks the threshold for another target from the stored table
    image = sorted((planned_dataset["raw_folder"] / "imagesTs").glob("*_0000.nii.gz"))[0]
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / image.name).write_bytes(image.read_bytes())
    out = tmp_path / "out"
    reports = run_predict_gfscreen(["-i", str(inputs), "-o", str(out), "-d", str(DATASET_ID), "-c", CONFIG,
                                    "-tr", trainer, "-f", "0", "-device", "cpu", "--disable_tta",
                                    "--target_sensitivity", "0.5"])
    assert reports[0]["threshold"] == pytest.approx(threshold_for_sensitivity(table, 0.5), abs=1e-6)
    assert 0 < reports[0]["tiles_selected"] <= reports[0]["tiles_total"]
