"""Gate threshold calibration: the curve, the choice, LOCO during validation, and the round trip through a
model folder (checkpoint key and JSON)."""
import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nnunetv2_gfscreen.core.coverage import CaseCoverage, operating_curve, threshold_for_target
from nnunetv2_gfscreen.core.calibration import calibrate_threshold, score_and_label_tiles, score_cases
from nnunetv2_gfscreen.core.calibration_store import CALIBRATION_FILE, CHECKPOINT_KEY, load_calibration
from nnunetv2_gfscreen.core.tiles import sliding_window_slicers
from nnunetv2_gfscreen.predictors.calibrate_cli import calibrate_entry_point
from nnunetv2_gfscreen.trainers.calibration_hook import loco_thresholds_during_validation
from tests.toy_models import toy_image, toy_network


def _tiles_only(scores, labels):
    scores = np.asarray(scores, np.float32)
    e = np.zeros(0, np.float32)
    return CaseCoverage(scores, np.asarray(labels), e, np.zeros(0, np.int64), e, np.zeros(0, np.int64))


def test_tile_columns_by_hand():
    t = operating_curve([_tiles_only([0.9, 0.8, 0.8, 0.3, 0.1], [True, False, True, True, False])])
    # candidates: below 0.1, between distinct scores, at the top
    np.testing.assert_allclose(t["threshold"], [0.05, 0.2, 0.55, 0.85, 0.9], rtol=1e-6)
    np.testing.assert_allclose(t["tile_sensitivity"], [1, 1, 2 / 3, 1 / 3, 0])
    np.testing.assert_allclose(t["selection_ratio"], [1, 0.8, 0.6, 0.2, 0])
    np.testing.assert_allclose(t["tile_specificity"], [0, 0.5, 0.5, 1, 1])
    assert t["lesion_sensitivity"] == [None] * 5 and t["voxel_coverage"] == [None] * 5
    assert threshold_for_target(t, 1.0, "tile_sensitivity") == pytest.approx(0.2)
    assert threshold_for_target(t, 0.6, "tile_sensitivity") == pytest.approx(0.55)
    with pytest.raises(ValueError, match="target"):
        threshold_for_target(t, 0.0, "tile_sensitivity")


def _covered_share(scores, slicers, lesion, threshold):
    """Brute force: share of lesion voxels inside the union of the tiles with score > threshold."""
    union = np.zeros(lesion.shape, bool)
    for s, score in zip(slicers, scores):
        if score > np.float32(threshold):
            union[s[1:]] = True
    return union[lesion].mean()


def test_calibrate_toy_network_on_lesion_coverage_and_no_lesion_case():
    net = toy_network(offset=0.5, threshold=0.5)
    img = toy_image((16, 40, 40), (slice(0, 6), slice(0, 14), slice(24, 40)), seed=1)
    seg = np.zeros((1, 16, 40, 40), np.uint8)
    seg[0, 2:4, 5:8, 30:33] = 1  # lesion inside the bright block
    patch = (8, 16, 16)
    result = calibrate_threshold(net, [(img, seg)], 1.0, patch_size=patch, case_ids=["toy"])
    scores, labels, _ = score_and_label_tiles(net, [(img, seg)], patch)
    assert result["tiles_total"] == 48 and result["tiles_positive"] == int(labels.sum()) > 0
    assert result["n_lesions"] == 1 and result["lesion_voxels"] == 18
    assert result["lesion_sensitivity"] == 1.0 and result["voxel_coverage"] == 1.0
    slicers = sliding_window_slicers((16, 40, 40), patch, 0.5)
    lesion = seg[0] > 0
    assert _covered_share(scores, slicers, lesion, result["threshold"]) >= 0.9
    # highest such threshold: the next curve threshold up loses the lesion
    curve = result["curve"]
    above = curve["threshold"][curve["threshold"].index(result["threshold"]) + 1]
    assert _covered_share(scores, slicers, lesion, above) < 0.9
    # never more tiles than the old rule (every tile touching the lesion selected)
    assert result["selection_ratio"] <= (scores >= scores[labels].min()).mean()
    assert result["tile_margin"] == 0.0 and result["patch_size"] == list(patch)
    assert result["loco"]["cases"][0]["fallback"] and "one calibration case" in result["note"]
    assert float(net.threshold) == 0.5  # calibration does not modify the network
    healthy = calibrate_threshold(net, [(img, np.zeros_like(seg))], 0.98, patch_size=patch)
    assert healthy["threshold"] == 0.5 and "no lesions" in healthy["note"]
    assert healthy["lesion_sensitivity"] is None and healthy["tile_sensitivity"] is None
    # a wide margin only counts the tiles' central regions: never a higher threshold
    margin = calibrate_threshold(net, [(img, seg)], 1.0, patch_size=patch, tile_margin=0.25)
    assert margin["tile_margin"] == 0.25 and margin["threshold"] <= result["threshold"]


def test_validation_uses_each_cases_loco_threshold():
    net = toy_network(threshold=0.3)

    class Dataset:
        def __init__(self, folder, keys, **kwargs):
            self.identifiers = list(keys)

        def load_case(self, k):
            return k, None, None, {}

    log = []
    trainer = SimpleNamespace(network=net, dataset_class=Dataset, print_to_log_file=log.append)
    result = {"threshold": 0.3, "loco": {"cases": [{"case": "a", "threshold": 0.7}, {"case": "b", "threshold": 0.1}]}}
    with loco_thresholds_during_validation(trainer, result):
        ds = trainer.dataset_class("folder", ["a", "b", "c"], folder_with_segs_from_previous_stage=None)
        assert isinstance(ds, Dataset)
        seen = {}
        for k in ds.identifiers:
            assert ds.load_case(k)[0] == k
            seen[k] = float(net.threshold)
    assert seen == pytest.approx({"a": 0.7, "b": 0.1, "c": 0.3})  # c: not calibrated, all-cases threshold
    assert trainer.dataset_class is Dataset and float(net.threshold) == pytest.approx(0.3)
    assert "leave-one-case-out" in log[0]
    with pytest.raises(RuntimeError):  # restored after a failure too
        with loco_thresholds_during_validation(trainer, result):
            trainer.dataset_class("f", ["a"]).load_case("a")
            raise RuntimeError
    assert trainer.dataset_class is Dataset and float(net.threshold) == pytest.approx(0.3)


# ---------------------------------------------------------------------- round trip through a model folder
def test_calibration_round_trip(planned_dataset, tmp_path, monkeypatch, capsys):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2_gfscreen.core.coverage import choose_threshold, curve_at
    from nnunetv2_gfscreen.predictors.cli import run_predict_gfscreen, thresholds_from_calibration
    from nnunetv2_gfscreen.trainers.GFScreenTrainer import GFScreenTrainer
    from tests.nnunet_fixtures import CONFIG, DATASET_ID
    from tests.toy_models import make_model_folder, patch_nnunet_paths

    patch_nnunet_paths(monkeypatch, planned_dataset["root"])
    trainer = "GFScreenTrainer_NoAlphaCE"  # same network; a model folder of its own
    model_folder, _ = make_model_folder(planned_dataset, trainer, seed=3)
    fold = model_folder / "fold_0"
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
    monkeypatch.setattr(sys, "argv", args + ["--target_sensitivity", "0.98", "--tile_margin", "0.1"])
    calibrate_entry_point()
    printed = capsys.readouterr().out
    assert "lesion-level sensitivity" in printed and "Leave-one-case-out" in printed
    stored = json.loads((fold / CALIBRATION_FILE).read_text())["checkpoints"]["checkpoint_final.pth"]
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    result = load_calibration(str(fold))
    assert ckpt[CHECKPOINT_KEY] == stored == result  # the checkpoint carries the same entry as the JSON
    assert result["n_cases"] == len(val_keys) and result["target_lesion_sensitivity"] == 0.98
    assert result["tile_margin"] == 0.1 and result["tile_step_size"] == 0.5
    assert {r["case"] for r in result["loco"]["cases"]} == set(val_keys)
    curve = result["curve"]
    for key in ("selection_ratio", "voxel_coverage", "lesion_sensitivity", "tile_sensitivity"):
        assert np.all(np.diff(curve[key]) <= 1e-12), key
    assert result["threshold"] in curve["threshold"]

    # the checkpoint loads strictly into a fresh network and carries the chosen threshold
    net = GFScreenTrainer.build_network_architecture(pm, pm.get_configuration(CONFIG), 1, 2, False)
    net.load_state_dict(ckpt["network_weights"], strict=True)
    assert float(net.threshold) == pytest.approx(result["threshold"], abs=1e-7)
    # ... and meets the target on the calibration cases, scored again from the reloaded weights
    ds = dataset_class(str(data_folder), list(val_keys))
    cases = [(torch.from_numpy(np.asarray(d[:], np.float32)), np.asarray(s[:]))
             for d, s, _, _ in (ds.load_case(k) for k in ds.identifiers)]
    rescored = score_cases(net.eval(), cases, pm.get_configuration(CONFIG).patch_size, tile_margin=0.1)
    assert sum(c.n_lesions for c in rescored) == result["n_lesions"] > 0
    at = operating_curve(rescored, [float(net.threshold)])
    assert at["lesion_sensitivity"][0] >= 0.98

    # without the JSON the checkpoint alone still has it (what an exported model zip carries)
    (fold / CALIBRATION_FILE).unlink()
    assert load_calibration(str(fold)) == result

    # --max_selection and both constraints pick from the stored curve
    budget = curve_at(curve, result["threshold"])["selection_ratio"] / 2
    (t_budget,) = thresholds_from_calibration(str(model_folder), [0], "checkpoint_final.pth", max_selection=budget)
    assert curve_at(curve, t_budget)["selection_ratio"] <= budget and t_budget > result["threshold"]
    (t_both,) = thresholds_from_calibration(str(model_folder), [0], "checkpoint_final.pth", 0.98, budget)
    assert t_both == t_budget and "selection budget" in capsys.readouterr().out

    # the predict CLI picks the threshold for another target from the stored curve
    image = sorted((planned_dataset["raw_folder"] / "imagesTs").glob("*_0000.nii.gz"))[0]
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / image.name).write_bytes(image.read_bytes())
    out = tmp_path / "out"
    reports = run_predict_gfscreen(["-i", str(inputs), "-o", str(out), "-d", str(DATASET_ID), "-c", CONFIG,
                                    "-tr", trainer, "-f", "0", "-device", "cpu", "--disable_tta",
                                    "--target_sensitivity", "0.5"])
    assert reports[0]["threshold"] == pytest.approx(choose_threshold(curve, 0.5)[0], abs=1e-6)
    assert "fold 0: threshold" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--threshold"):
        run_predict_gfscreen(["-i", str(inputs), "-o", str(out), "-d", str(DATASET_ID), "-c", CONFIG, "-tr", trainer,
                              "-f", "0", "-device", "cpu", "--threshold", "0.5", "--max_selection", "0.2"])
