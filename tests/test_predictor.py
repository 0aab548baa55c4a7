"""GFScreenPredictor against nnU-Net's own predictor, with a toy GFScreenNetwork on the CPU."""
import math

import numpy as np
import pytest
import torch

from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian

from nnunetv2_gfscreen.core.gate import GateRule
from nnunetv2_gfscreen.core.tiles import sliding_window_slicers
from nnunetv2_gfscreen.predictors.gfscreen_predictor import GFScreenPredictor
from nnunetv2_gfscreen.predictors.case_summary import build_case_report, lesion_components, tile_bbox_to_original
from tests.toy_models import init_predictor, toy_image, toy_network

PATCH = (8, 16, 16)
SHAPE = (16, 40, 40)  # 3 x 4 x 4 = 48 tiles at step 0.5
BRIGHT = (slice(0, 6), slice(0, 14), slice(24, 40))
CPU = torch.device('cpu')


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # nnU-Net's producer thread + OpenMP spinning is slow on a shared 2-core box
    yield
    torch.set_num_threads(n)


def _stock(net, mirror):
    return init_predictor(nnUNetPredictor(device=CPU, use_mirroring=mirror, allow_tqdm=False), net, PATCH)


def _ours(net, mirror, **kw):
    kw.setdefault("border_growth", False)  # exact comparisons with the stock path, which cannot grow
    return init_predictor(GFScreenPredictor(device=CPU, use_mirroring=mirror, allow_tqdm=False, **kw), net, PATCH)


def _image():
    return toy_image(SHAPE, BRIGHT, seed=1)


def _expected_selection(img, offset, threshold):
    """The toy Glance's rule, computed here independently: logit 10 * (mean - offset) > threshold."""
    slicers = sliding_window_slicers(img.shape[1:], PATCH, 0.5)
    means = torch.tensor([float(img[s].mean()) for s in slicers], dtype=torch.float64)
    return slicers, 10 * (means - offset) > threshold


def test_tiling_matches_nnunet():
    stock = _stock(toy_network(), False)
    assert sliding_window_slicers(SHAPE, PATCH, 0.5) == stock._internal_get_sliding_window_slicers(SHAPE)


@pytest.mark.parametrize("mirror", [False, True])
def test_everything_selected_equals_stock(mirror):
    net, img = toy_network(offset=0.5), _image()
    with net.ungated():
        ref = _stock(net, mirror).predict_sliding_window_return_logits(img)
    # tile batch 1: same operations in the same order as nnU-Net -> identical fp16 result
    below_all = _ours(net, mirror, threshold=-1e9, tile_batch_size=1)
    out = below_all.predict_sliding_window_return_logits(img)
    assert below_all.records[-1].tiles_selected == 48
    assert torch.equal(out, ref)
    # batched Focus and dense mode: equal to fp16 accumulation tolerance
    glance_tiles = []
    glance_forward = net.glance.forward
    net.glance.forward = lambda x: glance_tiles.append(x.shape[0]) or glance_forward(x)
    dense = _ours(net, mirror, dense=True, tile_batch_size=5)
    out = dense.predict_sliding_window_return_logits(img)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=1e-2)
    assert dense.records[-1].tiles_selected == 48 and dense.records[-1].scores == []
    assert glance_tiles == []  # --dense runs no Glance
    scored = _ours(net, mirror, dense=True, score_dense=True)
    scored.predict_sliding_window_return_logits(img)
    assert len(scored.records[-1].scores) == 48 and sum(glance_tiles) == 48


@pytest.mark.parametrize("mirror", [False, True])
def test_gated_equals_gated_network_path(mirror):
    offset, threshold = 0.5, 0.0
    net, img = toy_network(offset=offset, threshold=threshold), _image()
    slicers, expected = _expected_selection(img, offset, threshold)
    assert 0 < int(expected.sum()) < len(slicers) // 2
    ours = _ours(net, mirror, tile_batch_size=3)
    out = ours.predict_sliding_window_return_logits(img).float()
    assert ours.records[-1].selected == expected.tolist()

    focus_tiles, glance_tiles = [], []
    forward, glance_forward = net.focus.forward, net.glance.forward
    net.focus.forward = lambda x: focus_tiles.append(x.shape[0]) or forward(x)
    net.glance.forward = lambda x: glance_tiles.append(x.shape[0]) or glance_forward(x)
    gated = _stock(net, mirror).predict_sliding_window_return_logits(img).float()  # network gates itself
    n_passes = 8 if mirror else 1
    assert sum(glance_tiles) == len(slicers)  # once per tile, whatever the TTA
    assert sum(focus_tiles) == int(expected.sum()) * n_passes

    # the stock blend divides by the weights of all tiles, ours by those of the selected ones
    g = compute_gaussian(PATCH, sigma_scale=1. / 8, value_scaling_factor=10, device=CPU).float()
    w_all, w_sel = torch.zeros(SHAPE), torch.zeros(SHAPE)
    for s, keep in zip(slicers, expected):
        w_all[s[1:]] += g
        if keep:
            w_sel[s[1:]] += g
    covered = w_sel > 0
    assert 0 < covered.float().mean() < 0.6
    assert torch.all(out[:, ~covered] == 0) and torch.all(gated[:, ~covered] == 0)
    # where every covering tile was selected the two blends are the same sum
    full = covered & (w_sel == w_all)
    assert full.sum() > 1000
    torch.testing.assert_close(out[:, full], gated[:, full], atol=1e-2, rtol=1e-2)
    # elsewhere they differ by the weight ratio (checked where fp16 rounding is not blown up by it)
    partial = covered & ~full & (w_sel > 0.2 * w_all) & (w_sel > 1e-2)  # fp16 subnormals at tile rims
    assert partial.sum() > 100
    torch.testing.assert_close(out[:, partial], (gated * w_all / w_sel.clamp(min=1e-6))[:, partial],
                               atol=5e-2, rtol=5e-2)
    # argmax identical except at fp16 near-ties of the two classes
    differ = out.argmax(0) != gated.argmax(0)
    margin = (out[1] - out[0]).abs()
    assert differ.sum() <= 3 and torch.all(margin[differ] < 1e-2)


@pytest.mark.parametrize("mirror,batch", [(False, 2), (True, 3)])
def test_rejected_tiles_never_reach_the_focus(mirror, batch):
    offset, threshold = 0.5, 0.0
    net, img = toy_network(offset=offset, threshold=threshold), _image()
    slicers, expected = _expected_selection(img, offset, threshold)
    seen = []
    forward = net.focus.forward
    net.focus.forward = lambda x: seen.append(x.clone()) or forward(x)
    _ours(net, mirror, tile_batch_size=batch).predict_sliding_window_return_logits(img)
    n_sel = int(expected.sum())
    n_passes = 8 if mirror else 1
    assert len(seen) == math.ceil(n_sel / batch) * n_passes
    assert sum(x.shape[0] for x in seen) == n_sel * n_passes
    selected_tiles = torch.stack([img[s] for s, k in zip(slicers, expected) if k])
    if not mirror:
        assert torch.equal(torch.cat(seen), selected_tiles)
    else:  # the unflipped passes are the first call of each batch's 8
        assert torch.equal(torch.cat(seen[::8]), selected_tiles)


def test_nothing_selected_gives_background_not_nan():
    net, img = toy_network(offset=100.0), _image()
    ours = _ours(net, False)
    out = ours.predict_sliding_window_return_logits(img)
    assert ours.records[-1].tiles_selected == 0
    assert not torch.isnan(out).any() and torch.all(out == 0) and torch.all(out.argmax(0) == 0)


def test_threshold_override_and_fold_rules():
    net, img = toy_network(offset=0.5, threshold=0.0), _image()
    scores = _ours(net, False, dense=True, score_dense=True)
    scores.predict_sliding_window_return_logits(img)
    s = np.array(scores.records[-1].scores)
    t = float(np.sort(s)[-10] - 1e-6)  # exactly the 10 best tiles pass
    override = _ours(net, False, threshold=t)
    override.predict_sliding_window_return_logits(img)
    assert override.records[-1].tiles_selected == 10 and override.records[-1].threshold == t
    per_fold = _ours(net, False)
    per_fold.list_of_parameters = [{k: v.clone() for k, v in net.state_dict().items()}]
    per_fold.set_fold_rules([GateRule(threshold=t)])
    per_fold.predict_logits_from_preprocessed_data(img)
    assert per_fold.records[-1].tiles_selected == 10
    # the floor: the top 20% of the 48 tiles (10) whatever the threshold
    floor = _ours(net, False, rule=GateRule(threshold=1e9, floor=0.2))
    floor.predict_sliding_window_return_logits(img)
    assert floor.records[-1].tiles_selected == 10 and floor.records[-1].tiles_by_floor == 10


def test_padding_offsets_in_record():
    net = toy_network(offset=0.5)
    img = toy_image((5, 40, 40), (slice(0, 5), slice(0, 10), slice(0, 10)), seed=2)  # z shorter than the patch
    ours = _ours(net, False, dense=True)
    out = ours.predict_sliding_window_return_logits(img)
    assert out.shape == (2, 5, 40, 40)
    rec = ours.records[-1]
    assert rec.image_shape == (5, 40, 40)
    assert all(b[0] == [0, 5] for b in rec.bboxes)  # padded 5 -> 8 (1 below, 2 above), clipped back
    assert {tuple(b[1]) for b in rec.bboxes} == {(0, 16), (8, 24), (16, 32), (24, 40)}


def test_non_gfscreen_network_is_refused():
    from tests.toy_models import tiny_focus
    ours = _ours(tiny_focus(), False)
    with pytest.raises(TypeError, match="GFScreenNetwork"):
        ours.predict_sliding_window_return_logits(_image())


def test_bbox_to_original_undoes_resampling_crop_and_transpose():
    # original array (reader order) 30 x 50 x 60; transpose_forward (2, 0, 1) -> 60 x 30 x 50;
    # cropped to [5, 55) x [0, 30) x [10, 50) -> 50 x 30 x 40; resampled to 25 x 60 x 40
    props = {"shape_before_cropping": [60, 30, 50], "bbox_used_for_cropping": [[5, 55], [0, 30], [10, 50]],
             "shape_after_cropping_and_before_resampling": [50, 30, 40]}
    transpose_backward = [1, 2, 0]
    box = tile_bbox_to_original([[3, 10], [7, 20], [0, 40]], (25, 60, 40), props, transpose_backward)
    # transposed frame: [6, 20) + 5 -> [11, 25); [3.5, 10) -> [3, 10); [0, 40) + 10 -> [10, 50)
    assert box == [[3, 10], [10, 50], [11, 25]]


def test_lesion_components_and_report():
    mask = np.zeros((10, 12, 12), np.uint8)
    mask[1:3, 1:3, 1:3] = 1  # 8 voxels
    mask[5, 5, 5] = 1
    mask[6, 6, 6] = 1  # diagonal neighbour: same 26-connected lesion
    lesions = lesion_components(mask, (2.0, 0.5, 0.5))
    assert [l["voxels"] for l in lesions] == [8, 2]
    assert [l["volume_mm3"] for l in lesions] == [4.0, 1.0]
    assert lesions[0]["centroid_zyx"] == [1.5, 1.5, 1.5] and lesions[1]["centroid_zyx"] == [5.5, 5.5, 5.5]

    from nnunetv2_gfscreen.core.records import SlidingWindowRecord
    rec = SlidingWindowRecord((10, 12, 12), [[[0, 5], [0, 12], [0, 12]], [[5, 10], [0, 12], [0, 12]]],
                              [3.5, -2.0], [True, False], [False, False], threshold=0.5, rule=GateRule(0.5).to_dict(),
                              glance_seconds=0.25, focus_seconds=1.0)
    props = {"shape_before_cropping": [10, 12, 12], "bbox_used_for_cropping": [[0, 10], [0, 12], [0, 12]],
             "shape_after_cropping_and_before_resampling": [10, 12, 12]}
    r = build_case_report("GFS_0001", [rec], props, [0, 1, 2], lesions, 3.0)
    assert (r["tiles_total"], r["tiles_selected"], r["selection_ratio"]) == (2, 1, 0.5)
    assert r["tiles"][1] == {"bbox_original": [[5, 10], [0, 12], [0, 12]], "score": -2.0, "selected": False,
                             "grown": False}
    assert r["gate"]["rule"]["threshold"] == 0.5 and not r["gate"]["calibrated"]
    assert (r["glance_seconds"], r["focus_seconds"], r["total_seconds"], r["threshold"]) == (0.25, 1.0, 3.0, 0.5)


# ---------------------------------------------------------------------- command line, on a planned nnU-Net dataset
import json
import shutil
import sys

import SimpleITK as sitk

from nnunetv2_gfscreen.core.network import GFScreenNetwork
from nnunetv2_gfscreen.core.tiles import score_tile_logits
from nnunetv2_gfscreen.predictors.cli import predict_gfscreen_entry_point
from nnunetv2_gfscreen.predictors.gfscreen_predictor import CaseInputError
from tests.nnunet_fixtures import CONFIG, DATASET_ID
from tests.toy_models import make_model_folder, patch_nnunet_paths, write_rule


@pytest.fixture(scope="module")
def gated_model(planned_dataset, tmp_path_factory):
    """An untrained GF-Screen model whose stored threshold is the median Glance score of one test case."""
    model_folder, _ = make_model_folder(planned_dataset, "GFScreenTrainer")
    inputs = tmp_path_factory.mktemp("inputs")
    image = sorted((planned_dataset["raw_folder"] / "imagesTs").glob("*_0000.nii.gz"))[0]
    shutil.copy(image, inputs / image.name)
    case = image.name[:-len("_0000.nii.gz")]
    predictor = GFScreenPredictor(device=CPU, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_folder), [0])
    data, _ = predictor.preprocess_case([str(inputs / image.name)], case)
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    patch = predictor.configuration_manager.patch_size
    padded = pad_nd_image(data, patch, 'constant', {'value': 0}, False, None)
    scores = score_tile_logits(predictor.gfscreen_network, padded, sliding_window_slicers(padded.shape[1:], patch, 0.5),
                               8, CPU).numpy()
    s = np.sort(scores)
    threshold = float(s[len(s) // 2 - 1] + s[len(s) // 2]) / 2  # half the tiles, between two scores
    write_rule(model_folder / "fold_0" / "checkpoint_final.pth", GateRule(threshold=threshold))
    n_selected = int((scores > threshold).sum())
    assert 0 < n_selected < len(scores)
    return {"model_folder": model_folder, "inputs": inputs, "case": case, "threshold": threshold,
            "n_tiles": len(scores), "n_selected": n_selected, "image": image}


def _argv(inputs, out, *extra, tr="GFScreenTrainer"):
    return ["prog", "-i", str(inputs), "-o", str(out), "-d", str(DATASET_ID), "-c", CONFIG, "-tr", tr, "-f", "0",
            "-device", "cpu", "--disable_tta", "-npp", "0", "-nps", "0", *extra]


def test_cli_report_and_stock_cli_is_gated(gated_model, planned_dataset, tmp_path, monkeypatch):
    patch_nnunet_paths(monkeypatch, planned_dataset["root"])
    out = tmp_path / "gfscreen"
    monkeypatch.setattr(sys, "argv", _argv(gated_model["inputs"], out, "--png", "--tile_batch_size", "3",
                                           "--no_border_growth"))
    predict_gfscreen_entry_point()
    case = gated_model["case"]
    mask_file = out / f"{case}.nii.gz"
    report = json.loads((out / "gfscreen_reports" / f"{case}.json").read_text())
    assert (out / "gfscreen_reports" / f"{case}.png").is_file()
    assert (report["tiles_total"], report["tiles_selected"]) == (gated_model["n_tiles"], gated_model["n_selected"])
    assert report["selection_ratio"] == round(gated_model["n_selected"] / gated_model["n_tiles"], 4)
    assert report["threshold"] == pytest.approx(gated_model["threshold"], abs=1e-6) and report["dense"] is False
    assert all(t["selected"] == (t["score"] > report["threshold"]) for t in report["tiles"]
               if abs(t["score"] - report["threshold"]) > 1e-5)
    assert report["total_seconds"] >= report["glance_seconds"] + report["focus_seconds"] > 0
    # tile boxes lie in the original image and together cover it
    mask_img = sitk.ReadImage(str(mask_file))
    mask = sitk.GetArrayFromImage(mask_img)
    covered = np.zeros(mask.shape, bool)
    for t in report["tiles"]:
        (z0, z1), (y0, y1), (x0, x1) = t["bbox_original"]
        assert 0 <= z0 < z1 <= mask.shape[0] and 0 <= y0 < y1 <= mask.shape[1] and 0 <= x0 < x1 <= mask.shape[2]
        covered[z0:z1, y0:y1, x0:x1] = True
    assert covered.all()
    # lesions: components of the written mask; volumes use the file's spacing
    voxel_mm3 = float(np.prod(mask_img.GetSpacing()))
    assert sum(l["voxels"] for l in report["lesions"]) == int((mask > 0).sum())
    assert all(l["volume_mm3"] == pytest.approx(l["voxels"] * voxel_mm3, abs=6e-4) for l in report["lesions"])

    # stock nnUNetv2_predict on the same model folder: the network gates itself
    counts = {"scored": 0, "selected": 0}
    original = GFScreenNetwork._focus_on_selected

    def counting(self, x, selected):
        counts["scored"] += x.shape[0]
        counts["selected"] += int(selected.sum())
        return original(self, x, selected)

    monkeypatch.setattr(GFScreenNetwork, "_focus_on_selected", counting)
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point
    stock_out = tmp_path / "stock"
    monkeypatch.setattr(sys, "argv", _argv(gated_model["inputs"], stock_out)[:-2] + ["-npp", "0", "-nps", "0"])
    predict_entry_point()
    assert counts["scored"] == gated_model["n_tiles"] and counts["selected"] == gated_model["n_selected"]
    stock_mask = sitk.GetArrayFromImage(sitk.ReadImage(str(stock_out / f"{case}.nii.gz")))
    # same decisions, so the same voxels are left to background; the logits differ by a positive per-voxel
    # factor, which only moves near-tie boundaries of this untrained Focus after resampling
    selected_region = np.zeros(mask.shape, bool)
    for t in report["tiles"]:
        if t["selected"]:
            selected_region[tuple(slice(a, b) for a, b in t["bbox_original"])] = True
    assert not selected_region.all()
    assert not mask[~selected_region].any() and not stock_mask[~selected_region].any()
    assert (stock_mask == mask).mean() > 0.98


def test_cli_bad_inputs_write_nothing(gated_model, planned_dataset, tmp_path, monkeypatch):
    patch_nnunet_paths(monkeypatch, planned_dataset["root"])
    inputs = tmp_path / "bad"
    inputs.mkdir()
    img = sitk.ReadImage(str(gated_model["image"]))
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    arr[3, 10, 10] = np.nan
    nan_img = sitk.GetImageFromArray(arr)
    nan_img.CopyInformation(img)
    sitk.WriteImage(nan_img, str(inputs / "nanimg_0000.nii.gz"))
    shutil.copy(gated_model["image"], inputs / "twochan_0000.nii.gz")
    shutil.copy(gated_model["image"], inputs / "twochan_0001.nii.gz")
    (inputs / "garbage_0000.nii.gz").write_bytes(b"this is not a NIfTI file")
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", _argv(inputs, out))
    with pytest.raises(CaseInputError) as e:
        predict_gfscreen_entry_point()
    msg = str(e.value)
    assert "3 case(s)" in msg
    assert "case nanimg: image contains 1 NaN/inf voxel(s)" in msg
    assert "case twochan: expected 1 channel file(s)" in msg and "got 2" in msg
    assert "case garbage: could not read" in msg
    leftovers = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert leftovers == ["dataset.json", "plans.json", "predict_from_raw_data_args.json"]

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(sys, "argv", _argv(empty, tmp_path / "out2"))
    with pytest.raises(ValueError, match="has no images ending in '.nii.gz'"):
        predict_gfscreen_entry_point()


def test_export_failure_leaves_no_file(gated_model, tmp_path, monkeypatch):
    predictor = GFScreenPredictor(device=CPU, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(gated_model["model_folder"]), [0])
    data, props = predictor.preprocess_case([str(gated_model["image"])], "c")
    logits = torch.zeros((2, *data.shape[1:]))
    rw_class = predictor.plans_manager.image_reader_writer_class

    def failing_write(self, seg, output_fname, properties):
        open(output_fname, "wb").write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(rw_class, "write_seg", failing_write)
    with pytest.raises(OSError, match="disk full"):
        predictor.export_case(logits, props, str(tmp_path / "c"))
    assert list(tmp_path.iterdir()) == []
