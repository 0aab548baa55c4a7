"""Gating inside nnU-Net's own loops (issue 10): one decision per tile however nnU-Net's mirroring TTA flips it,
one decision per case for a fold ensemble, and saved probabilities that show the gate's decision."""
import numpy as np
import pytest
import torch

from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunetv2_gfscreen.core.network import GFScreenNetwork
from nnunetv2_gfscreen.core.tiles import sliding_window_slicers
from nnunetv2_gfscreen.core.gate import Gate, GateRule
from nnunetv2_gfscreen.predictors.gfscreen_predictor import GFScreenPredictor
from tests.toy_models import TiltedGlance, init_predictor, tiny_focus, toy_image

PATCH = (8, 16, 16)
SHAPE = (16, 40, 40)  # 3 x 4 x 4 = 48 tiles at step 0.5
BRIGHT = (slice(0, 6), slice(0, 14), slice(24, 40))
CPU = torch.device('cpu')
N_FLIPS = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def _net(offset, tilt, focus_seed=0, threshold=0.0):
    return GFScreenNetwork(tiny_focus(seed=focus_seed), TiltedGlance(offset, tilt), 2,
                           GateRule(threshold=threshold)).eval()


def _record_stock_decisions(monkeypatch):
    """Every decision the network takes inside nnU-Net's loop, one list per network call."""
    calls = []
    original = GFScreenNetwork._focus_on_selected

    def recording(self, x, selected):
        calls.append(selected.tolist())
        return original(self, x, selected)

    monkeypatch.setattr(GFScreenNetwork, "_focus_on_selected", recording)
    return calls


def test_stock_tta_gives_each_tile_one_decision_the_gfscreen_predictor_shares(monkeypatch):
    """A Glance that is not flip-invariant: nnU-Net's 8 TTA calls per tile still get one decision, the Glance runs
    once per tile, and GFScreenPredictor decides the same (it scores each unflipped tile once too)."""
    net, img = _net(offset=0.45, tilt=4.0), toy_image(SHAPE, BRIGHT, seed=1)
    glance_tiles = []
    glance_forward = net.glance.forward
    net.glance.forward = lambda x: glance_tiles.append(x.shape[0]) or glance_forward(x)
    calls = _record_stock_decisions(monkeypatch)
    stock = init_predictor(nnUNetPredictor(device=CPU, use_mirroring=True, allow_tqdm=False), net, PATCH)
    stock_out = stock.predict_sliding_window_return_logits(img).float()
    n_tiles = len(sliding_window_slicers(SHAPE, PATCH, 0.5))
    assert len(calls) == n_tiles * N_FLIPS and all(len(c) == 1 for c in calls)  # batch 1, 8 flips per tile
    assert sum(glance_tiles) == n_tiles  # one Glance pass per tile, not per flip
    per_tile = [{c[0] for c in calls[i:i + N_FLIPS]} for i in range(0, len(calls), N_FLIPS)]
    assert all(len(d) == 1 for d in per_tile)
    stock_selected = [d.pop() for d in per_tile]
    # the toy Glance is not flip-invariant: scoring each flipped copy on its own would decide differently
    slicers = sliding_window_slicers(SHAPE, PATCH, 0.5)
    with torch.no_grad():
        flipped = [[bool(net.glance(torch.flip(img[s][None], f)) > 0) for f in ((), (2,), (3, 4))] for s in slicers]
    assert any(len(set(d)) == 2 for d in flipped)
    ours = init_predictor(GFScreenPredictor(device=CPU, use_mirroring=True, allow_tqdm=False, tile_batch_size=3,
                                            border_growth=False), net, PATCH)
    out = ours.predict_sliding_window_return_logits(img).float()
    assert ours.records[-1].selected == stock_selected
    assert 0 < sum(stock_selected) < n_tiles // 2
    # same decisions: the same voxels are left to background, and the Focus's mirrored predictions agree where
    # the two blends agree (voxels whose covering tiles were all selected)
    covered, all_selected = torch.zeros(SHAPE, dtype=torch.bool), torch.ones(SHAPE, dtype=torch.bool)
    for s, keep in zip(slicers, stock_selected):
        if keep:
            covered[s[1:]] = True
        else:
            all_selected[s[1:]] = False
    full = covered & all_selected
    assert full.sum() > 1000 and (covered & ~full).sum() > 100
    assert torch.all(out[:, ~covered] == 0) and torch.all(stock_out[:, ~covered] == 0)
    torch.testing.assert_close(out[:, full], stock_out[:, full], atol=1e-2, rtol=1e-2)
    # elsewhere the blends differ by a positive factor per voxel: argmax equal except at fp16 near-ties
    assert (out.argmax(0) != stock_out.argmax(0)).sum() <= 3


def test_fold_ensemble_gates_once_on_the_folds_mean_glance():
    a, b = 0.3, 0.9
    ta, tb = 2.0, 0.0  # threshold logits
    fold_a = _net(offset=a, tilt=0.0, focus_seed=1, threshold=ta)
    fold_b = _net(offset=b, tilt=0.0, focus_seed=2, threshold=tb)
    img = toy_image(SHAPE, BRIGHT, seed=1)
    slicers = sliding_window_slicers(SHAPE, PATCH, 0.5)
    means = torch.tensor([float(img[s].mean()) for s in slicers], dtype=torch.float64)
    alone_a = 10 * (means - a) > ta
    alone_b = 10 * (means - b) > tb
    pooled = (ta + tb) / 2  # pool_rules: the mean threshold logit
    shared = 10 * (means - (a + b) / 2) > pooled
    assert (alone_a & ~shared).any() and (shared & ~alone_b).any()  # the folds' Glances disagree both ways

    ens = init_predictor(GFScreenPredictor(device=CPU, use_mirroring=False, allow_tqdm=False, tile_batch_size=2,
                                           border_growth=False), fold_a, PATCH)
    ens.list_of_parameters = [fold_a.state_dict(), fold_b.state_dict()]
    seen = []
    forward = fold_a.focus.forward
    fold_a.focus.forward = lambda x: seen.append(x.shape[0]) or forward(x)
    glance_calls = []
    glance_forward = fold_a.glance.forward
    fold_a.glance.forward = lambda x: glance_calls.append(x.shape[0]) or glance_forward(x)
    out = ens.predict_logits_from_preprocessed_data(img)
    assert len(ens.records) == 2 and all(r.selected == shared.tolist() for r in ens.records)
    assert all(r.threshold == pytest.approx(pooled, abs=1e-12) for r in ens.records)
    assert ens.records[0].glance_seconds > 0 and ens.records[1].glance_seconds == 0
    assert sum(glance_calls) == 2 * len(slicers)  # each fold's Glance scores each tile once
    assert sum(seen) == 2 * int(shared.sum())  # every fold's Focus runs on the shared selection, nothing else
    assert ens._case_gate is None  # the next case decides afresh
    # scoring over folds leaves the network's own Glance as it found it
    from nnunetv2_gfscreen.core.ensemble_gate import score_tiles_over_folds
    before = {k: v.clone() for k, v in fold_b.glance.state_dict().items()}
    score_tiles_over_folds(fold_b, ens.list_of_parameters, img, slicers[:3], 2, CPU)
    assert all(torch.equal(before[k], v) for k, v in fold_b.glance.state_dict().items())

    # reference: each fold's Focus behind a single Glance that makes the shared decision, averaged like nnU-Net
    ref = None
    for seed in (1, 2):
        single = _net(offset=(a + b) / 2, tilt=0.0, focus_seed=seed, threshold=pooled)
        p = init_predictor(GFScreenPredictor(device=CPU, use_mirroring=False, allow_tqdm=False, tile_batch_size=2,
                                             border_growth=False), single, PATCH).predict_sliding_window_return_logits(img)
        assert p.shape == out.shape
        ref = p if ref is None else ref + p
    torch.testing.assert_close(out.float(), (ref / 2).float(), atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------------- saved probabilities (item 5)

from nnunetv2.inference.export_prediction import export_prediction_from_logits

from nnunetv2_gfscreen.predictors.case_summary import tile_bbox_to_original
from tests.toy_models import make_model_folder


def _flat(probabilities: np.ndarray) -> np.ndarray:
    return np.all(probabilities == probabilities[:1], axis=0)


def test_saved_probabilities_are_certain_background_where_no_selected_tile_reaches(planned_dataset, tmp_path):
    model_folder, _ = make_model_folder(planned_dataset, "GFScreenTrainer_DenseBalancedCE", seed=5)  # a folder of its own
    image = sorted((planned_dataset["raw_folder"] / "imagesTs").glob("*_0000.nii.gz"))[0]
    ours = GFScreenPredictor(device=CPU, use_mirroring=False, allow_tqdm=False, torch_io='off', dense=True,
                             score_dense=True, border_growth=False)
    ours.initialize_from_trained_model_folder(str(model_folder), [0])
    data, props = ours.preprocess_case([str(image)], "c")
    ours.predict_logits_from_preprocessed_data(data)
    s = np.sort(ours.records[-1].scores)
    threshold = float(s[len(s) // 2 - 1] + s[len(s) // 2]) / 2  # between two tiles: batch-size rounding cannot flip one
    ours.dense, ours.threshold = False, threshold
    ours.reset_records()
    logits = ours.predict_logits_from_preprocessed_data(data)
    record = ours.records[-1]
    assert 0 < record.tiles_selected < len(record.selected)
    mask_file = ours.export_case(logits, props, str(tmp_path / "ours"), save_probabilities=True)
    export_prediction_from_logits(logits, props, ours.configuration_manager, ours.plans_manager, ours.dataset_json,
                                  str(tmp_path / "nnunet"), True, 1)
    p_ours = np.load(tmp_path / "ours.npz")["probabilities"]
    p_nn = np.load(tmp_path / "nnunet.npz")["probabilities"]
    rw = ours.plans_manager.image_reader_writer_class()
    mask_ours, mask_nn = rw.read_seg(mask_file)[0][0], rw.read_seg(str(tmp_path / "nnunet.nii.gz"))[0][0]
    assert np.array_equal(mask_ours, mask_nn)  # the argmax is nnU-Net's everywhere
    undecided = _flat(p_nn)  # nnU-Net's export: 1/K wherever the logits stayed zero
    assert 0.05 < undecided.mean() < 0.95 and np.all(p_nn[:, undecided] == 0.5)
    assert np.all(p_ours[0][undecided] == 1) and np.all(p_ours[1:][:, undecided] == 0) and not _flat(p_ours).any()
    assert np.array_equal(p_ours[:, ~undecided], p_nn[:, ~undecided])
    # undecided is what no selected tile covers, up to the resampling's blur at the tiles' rims
    selected_region = np.zeros(mask_ours.shape, bool)
    for box, keep in zip(record.bboxes, record.selected):
        if keep:
            b = tile_bbox_to_original(box, record.image_shape, props, ours.plans_manager.transpose_backward)
            selected_region[tuple(slice(lo, hi) for lo, hi in b)] = True
    agreement = (undecided == ~selected_region).mean()
    assert agreement > 0.95 and not np.any(mask_ours[undecided])

    # the stock predictor (nnUNetv2_predict --save_probabilities) on the same weights and threshold: the network
    # gates itself, but nnU-Net's export writes 1/K (0.5 here) where no selected tile reaches, as documented
    stock = nnUNetPredictor(device=CPU, use_mirroring=False, allow_tqdm=False)
    stock.initialize_from_trained_model_folder(str(model_folder), [0])
    Gate.write_rule_into_state_dict(stock.list_of_parameters[0], GateRule(threshold=threshold))
    export_prediction_from_logits(stock.predict_logits_from_preprocessed_data(data), props,
                                  stock.configuration_manager, stock.plans_manager, stock.dataset_json,
                                  str(tmp_path / "stock"), True, 1)
    p_stock = np.load(tmp_path / "stock.npz")["probabilities"]
    stock_flat = _flat(p_stock)
    assert np.all(p_stock[:, stock_flat] == 0.5) and stock_flat.sum() >= 0.99 * undecided.sum()
    # the same voxels, except a few dozen at selected tiles' rims (fp16 underflow of the stock blend's small
    # weighted logits, and exact fp16 ties of the two classes, which are background either way)
    assert (stock_flat != undecided).mean() < 1e-3


def test_predict_gfscreen_with_two_folds_gates_once(planned_dataset, tmp_path, monkeypatch):
    """nnUNetv2_predict_gfscreen -f 0 1 with two folds whose (random) Glances disagree."""
    from nnunetv2_gfscreen.predictors.cli import run_predict_gfscreen
    from tests.nnunet_fixtures import CONFIG, DATASET_ID
    from tests.toy_models import patch_nnunet_paths, write_rule

    patch_nnunet_paths(monkeypatch, planned_dataset["root"])
    trainer = "GFScreenTrainer_DenseOnly"  # same network; a model folder of its own
    image = sorted((planned_dataset["raw_folder"] / "imagesTs").glob("*_0000.nii.gz"))[0]
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / image.name).symlink_to(image)
    args = ["-i", str(inputs), "-d", str(DATASET_ID), "-c", CONFIG, "-tr", trainer, "-device", "cpu",
            "--disable_tta", "-npp", "0", "-nps", "0", "--no_border_growth"]
    scores, thresholds = {}, {}
    for fold, seed in ((0, 11), (1, 12)):
        model_folder, _ = make_model_folder(planned_dataset, trainer, seed=seed, fold=fold)
        dense = run_predict_gfscreen(args + ["-o", str(tmp_path / f"dense{fold}"), "-f", str(fold), "--dense",
                                             "--score_tiles"])[0]
        scores[fold] = np.array([t["score"] for t in dense["tiles"]])
        s = np.sort(scores[fold])
        thresholds[fold] = float(s[len(s) // 2 - 1] + s[len(s) // 2]) / 2  # each fold alone selects half the tiles
        write_rule(model_folder / f"fold_{fold}" / "checkpoint_final.pth", GateRule(threshold=thresholds[fold]))
    sel = {f: scores[f] > thresholds[f] for f in (0, 1)}
    assert (sel[0] != sel[1]).any()  # the folds disagree

    both = run_predict_gfscreen(args + ["-o", str(tmp_path / "both"), "-f", "0", "1"])[0]
    mean_logit = (scores[0] + scores[1]) / 2
    pooled = (thresholds[0] + thresholds[1]) / 2
    expected = mean_logit > pooled
    selected = np.array([t["selected"] for t in both["tiles"]])
    assert both["threshold"] == pytest.approx(pooled, abs=1e-12)
    assert np.array_equal(selected, expected) and not np.array_equal(selected, sel[0] | sel[1])
    assert [f["tiles_selected"] for f in both["folds"]] == [int(expected.sum())] * 2  # one decision, both Focuses
