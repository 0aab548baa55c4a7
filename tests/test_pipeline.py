"""Torch preprocessing/export inside GFScreenPredictor, and the pipelined folder loop (CPU, toy network).

Cases are small synthetic CTs (helpers of test_torch_preprocessing.py, loaded by path) written as NIfTI;
the plans are written here (CT normalisation, nnU-Net's default resampling, anisotropic spacing) and the
network is the toy GFScreenNetwork of toy_models.py, whose Glance selects tiles by mean intensity.
"""
import importlib.util
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_gfscreen.torch_io import export as torch_export, preprocessing as torch_preprocessing
from nnunetv2_gfscreen.predictors.cli import predict_folder
from nnunetv2_gfscreen.core.records import SlidingWindowRecord, selected_tiles_bbox
from nnunetv2_gfscreen.predictors.gfscreen_predictor import CaseInputError, GFScreenPredictor
from nnunetv2_gfscreen.predictors.pipeline import CaseFailedError, run_pipeline
from tests.toy_models import toy_network, toy_plans

_spec = importlib.util.spec_from_file_location('_torch_prepost_cases_pipeline',
                                               Path(__file__).with_name('test_torch_preprocessing.py'))
cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cases)

CPU = torch.device('cpu')
# z is shorter than the patch after resampling (17 < 24): the sliding window pads it, the records are unpadded
PATCH = (24, 32, 32)
CASE_SHAPE, CASE_SPACING = (20, 70, 60), (2.5, 0.7, 0.7)  # z, y, x; resampled to 3.0 x 0.8 x 0.8 mm
MIN_DICE = 0.99


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def _plans():
    pm, dataset_json = toy_plans(PATCH)
    plans = pm.plans
    plans["foreground_intensity_properties_per_channel"] = {"0": {
        "max": 700.0, "mean": 168.5, "median": 43.0, "min": -29.0, "percentile_00_5": 0.0, "percentile_99_5": 700.0,
        "std": 261.9}}
    plans["configurations"]["3d_fullres"].update({
        "spacing": [3.0, 0.8, 0.8], "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}})
    return PlansManager(plans), dataset_json


def _predictor(torch_io: str, dense: bool = False, threshold: float = 0.0) -> GFScreenPredictor:
    pm, dataset_json = _plans()
    net = toy_network(offset=0.0)
    predictor = GFScreenPredictor(device=CPU, use_mirroring=False, allow_tqdm=False, torch_io=torch_io, dense=dense,
                                  threshold=threshold, score_dense=dense, border_growth=False)
    predictor.manual_initialization(net, pm, pm.get_configuration("3d_fullres"),
                                    [{k: v.clone() for k, v in net.state_dict().items()}], dataset_json,
                                    "GFScreenTrainer", None)
    return predictor


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cases")
    for i in range(3):
        cases.write_image(cases.synthetic_ct(CASE_SHAPE, seed=10 + i), CASE_SPACING, folder / f"c{i}_0000.nii.gz")
    return folder


@pytest.fixture(scope="module")
def threshold(inputs, tmp_path_factory):
    """A gate threshold halfway between two well-separated Glance scores, selecting some but not all tiles."""
    out = tmp_path_factory.mktemp("probe")
    reports = predict_folder(_predictor("off", dense=True), str(inputs), str(out))
    scores = np.sort(np.concatenate([[t["score"] for t in r["tiles"]] for r in reports]))
    gaps = np.diff(scores)
    middle = np.arange(len(gaps))
    middle = middle[(middle > len(gaps) * 0.3) & (middle < len(gaps) * 0.8)]
    i = middle[np.argmax(gaps[middle])]
    assert gaps[i] > 1e-3, scores
    return float(scores[i] + gaps[i] / 2)


def _masks(folder: Path) -> dict:
    return {p.name[:-len(".nii.gz")]: sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
            for p in sorted(folder.glob("*.nii.gz"))}


def _dice(a, b) -> float:
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


# ---------------------------------------------------------------------- torch I/O against nnU-Net's path
@pytest.mark.parametrize("dense", [False, True])
def test_torch_io_matches_nnunet_path(dense, inputs, threshold, tmp_path, monkeypatch):
    boxes = []
    real_export = torch_export.export_logits_torch

    def spy(*args, covered_bbox=None, **kwargs):
        boxes.append(covered_bbox)
        return real_export(*args, covered_bbox=covered_bbox, **kwargs)

    monkeypatch.setattr("nnunetv2_gfscreen.predictors.gfscreen_predictor.export_logits_torch", spy)
    torch_predictor, nnunet_predictor = _predictor("on", dense, threshold), _predictor("off", dense, threshold)
    assert torch_predictor.use_torch_io and not nnunet_predictor.use_torch_io
    ours = predict_folder(torch_predictor, str(inputs), str(tmp_path / "torch"))
    ref = predict_folder(nnunet_predictor, str(inputs), str(tmp_path / "nnunet"))
    assert len(boxes) == 3 and all(r["torch_io"] for r in ours) and not any(r["torch_io"] for r in ref)
    masks, ref_masks = _masks(tmp_path / "torch"), _masks(tmp_path / "nnunet")
    assert sorted(masks) == ["c0", "c1", "c2"]
    for r, r_ref, box in zip(ours, ref, boxes):
        case = r["case"]
        assert [t["selected"] for t in r["tiles"]] == [t["selected"] for t in r_ref["tiles"]]
        mask = masks[case]
        assert mask.shape == CASE_SHAPE and ref_masks[case].shape == CASE_SHAPE
        assert (mask > 0).sum() > 200, case  # the toy Focus predicts foreground somewhere
        assert _dice(mask > 0, ref_masks[case] > 0) >= MIN_DICE, case
        if dense:
            assert box is None and r["tiles_selected"] == r["tiles_total"]
            continue
        assert 0 < r["tiles_selected"] < r["tiles_total"]
        # covered_bbox: the union of the selected tiles' boxes, in the (unpadded) preprocessed frame
        selected = [t for t in r["tiles"] if t["selected"]]
        assert box is not None and box[0] == [0, 17]  # z: one padded tile, clipped back to the 17 real slices
        # in original voxels the same box (outward rounding) plus one voxel of interpolation reach per side
        union = [[min(t["bbox_original"][d][0] for t in selected), max(t["bbox_original"][d][1] for t in selected)]
                 for d in range(3)]
        inside = np.zeros(CASE_SHAPE, bool)
        inside[tuple(slice(max(a - 1, 0), b + 1) for a, b in union)] = True
        assert not inside.all()
        assert not mask[~inside].any() and not ref_masks[case][~inside].any()


def test_selected_tiles_bbox_is_the_union_of_selected_tiles():
    shape = (17, 60, 52)
    boxes = [[[0, 17], [0, 32], [0, 32]], [[0, 17], [14, 46], [0, 32]], [[0, 17], [28, 60], [20, 52]]]
    one = SlidingWindowRecord(shape, boxes, [0.9, 0.1, 0.8], [True, False, True])
    assert selected_tiles_bbox([one]) == [[0, 17], [0, 60], [0, 52]]
    two = SlidingWindowRecord(shape, boxes, [0.1, 0.9, 0.1], [False, True, False])
    assert selected_tiles_bbox([two]) == [[0, 17], [14, 46], [0, 32]]
    assert selected_tiles_bbox([two, SlidingWindowRecord(shape, boxes, [0] * 3, [False] * 3)]) == \
        [[0, 17], [14, 46], [0, 32]]  # an ensemble: any fold's selection counts
    assert selected_tiles_bbox([SlidingWindowRecord(shape, boxes, [0] * 3, [False] * 3)]) == [[0, 0]] * 3
    assert selected_tiles_bbox([SlidingWindowRecord(shape, boxes, [0] * 3, [True] * 3, dense=True)]) is None
    with pytest.raises(ValueError, match="no sliding-window record"):
        selected_tiles_bbox([])


def test_torch_io_mode_is_validated():
    with pytest.raises(ValueError, match="'sometimes'"):
        GFScreenPredictor(device=CPU, torch_io="sometimes")
    assert not GFScreenPredictor(device=CPU).use_torch_io
    assert GFScreenPredictor(device=torch.device("cuda"), torch_io="auto").use_torch_io
    assert not GFScreenPredictor(device=torch.device("cuda"), torch_io="off").use_torch_io


def test_save_probabilities_uses_nnunet_export(inputs, threshold, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the torch export must not be used with save_probabilities")

    monkeypatch.setattr("nnunetv2_gfscreen.predictors.gfscreen_predictor.export_logits_torch", fail)
    predictor = _predictor("on", threshold=threshold)
    data, props = predictor.preprocess_case([str(inputs / "c0_0000.nii.gz")], "c0")
    logits = torch.zeros((2, *data.shape[1:]))
    predictor.export_case(logits, props, str(tmp_path / "c0"), save_probabilities=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c0.nii.gz", "c0.npz", "c0.pkl"]


def test_out_of_memory_fallback_is_reported_once_per_case(inputs, threshold, tmp_path, monkeypatch, capsys):
    calls = {"pre": 0, "export": 0}
    real_pre, real_resample = torch_preprocessing._preprocess, torch_export.resample_data_torch

    def flaky(kind, real):
        def f(*args, **kwargs):
            calls[kind] += 1
            if calls[kind] % 2 == 1:  # the first try of every case
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return real(*args, **kwargs)
        return f

    monkeypatch.setattr(torch_preprocessing, "_preprocess", flaky("pre", real_pre))
    monkeypatch.setattr(torch_export, "resample_data_torch", flaky("export", real_resample))
    predict_folder(_predictor("on", threshold=threshold), str(inputs), str(tmp_path))
    assert calls == {"pre": 6, "export": 6}
    lines = [l for l in capsys.readouterr().out.splitlines() if "out of memory" in l]
    expected = [f"case c{i}: out of memory on cpu while {stage}; {done} on the CPU" for i in range(3)
                for stage, done in (("preprocessing", "preprocessed"), ("exporting", "exported"))]
    assert sorted(lines) == sorted(expected)


# ---------------------------------------------------------------------- pipelined folder loop
@pytest.mark.parametrize("torch_io", ["on", "off"])
def test_pipelined_folder_equals_sequential(torch_io, inputs, threshold, tmp_path):
    seq = predict_folder(_predictor(torch_io, threshold=threshold), str(inputs), str(tmp_path / "seq"))
    t0 = time.perf_counter()
    pipe = predict_folder(_predictor(torch_io, threshold=threshold), str(inputs), str(tmp_path / "pipe"),
                          num_processes_preprocessing=2, num_processes_segmentation_export=2)
    wall = time.perf_counter() - t0
    seq_masks, pipe_masks = _masks(tmp_path / "seq"), _masks(tmp_path / "pipe")
    assert sorted(pipe_masks) == ["c0", "c1", "c2"] and sorted(seq_masks) == sorted(pipe_masks)
    for case in seq_masks:
        np.testing.assert_array_equal(pipe_masks[case], seq_masks[case])
    assert [r["case"] for r in pipe] == ["c0", "c1", "c2"]
    for a, b in zip(seq, pipe):
        assert a["tiles"] == b["tiles"] and a["lesions"] == b["lesions"]
    summary = json.loads((tmp_path / "pipe" / "gfscreen_pipeline.json").read_text())
    assert summary["cases_predicted"] == 3 and summary["num_processes_preprocessing"] == 2
    for r in pipe:
        phases = r["preprocess_seconds"] + r["sliding_window_seconds"] + r["export_seconds"]
        assert 0 < phases <= r["total_seconds"] + 1e-3 <= summary["pipeline_seconds"] + 2e-3
    assert summary["pipeline_seconds"] <= wall
    # no partial files and no worker thread left behind
    assert not [p for p in (tmp_path / "pipe").rglob("*partial*")]
    assert not [t for t in threading.enumerate() if t.name.startswith("gfscreen-")]


def test_preprocessing_error_stops_the_pipeline_naming_the_case(inputs, threshold, tmp_path):
    predictor = _predictor("on", threshold=threshold)
    real = predictor.preprocess_case

    def broken(files, case):
        if case == "c1":
            raise RuntimeError("simulated reader crash")
        return real(files, case)

    predictor.preprocess_case = broken
    outcome = {}

    def run():
        try:
            predict_folder(predictor, str(inputs), str(tmp_path), num_processes_preprocessing=2,
                           num_processes_segmentation_export=2)
        except BaseException as e:  # handed to the test thread
            outcome["error"] = e

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the pipeline hung after a preprocessing error"
    error = outcome["error"]
    assert isinstance(error, CaseFailedError) and (error.case, error.stage) == ("c1", "preprocessing")
    assert str(error) == "case c1: preprocessing failed: RuntimeError: simulated reader crash"
    assert isinstance(error.__cause__, RuntimeError)
    assert (tmp_path / "c0.nii.gz").is_file()  # predicted before the failure: exported
    assert not (tmp_path / "c1.nii.gz").exists() and not list(tmp_path.glob("*partial*"))


def test_bad_input_cases_are_skipped_in_the_pipeline(inputs, threshold, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("c0", "c2"):
        (folder / f"{name}_0000.nii.gz").write_bytes((inputs / f"{name}_0000.nii.gz").read_bytes())
    (folder / "c1_0000.nii.gz").write_bytes(b"not a NIfTI file")
    out = tmp_path / "out"
    with pytest.raises(CaseInputError) as e:
        predict_folder(_predictor("on", threshold=threshold), str(folder), str(out),
                       num_processes_preprocessing=2, num_processes_segmentation_export=1)
    assert "1 case(s)" in str(e.value) and "case c1: could not read" in str(e.value)
    assert sorted(_masks(out)) == ["c0", "c2"]
    assert json.loads((out / "gfscreen_pipeline.json").read_text())["cases_skipped"] == 1


# ---------------------------------------------------------------------- the scheduler alone
def test_run_pipeline_order_bounds_and_errors():
    main = threading.current_thread()
    live, peak, predicted_in = set(), [0], []
    lock = threading.Lock()

    def pre(i):
        time.sleep(0.01 * (3 - i % 3))  # later items may finish first
        with lock:
            live.add(i)
            peak[0] = max(peak[0], len(live))
        return i

    def predict(i):
        predicted_in.append((i, threading.current_thread() is main))
        with lock:
            live.discard(i)
        return i * 10

    results, skipped = run_pipeline(list(range(8)), [f"n{i}" for i in range(8)], pre, predict,
                                    lambda x: x + 1, num_preprocess=2, num_export=2)
    assert results == [i * 10 + 1 for i in range(8)] and skipped == []
    assert predicted_in == [(i, True) for i in range(8)]
    assert peak[0] <= 3  # the case being predicted plus at most 2 ahead

    def failing_export(x):
        if x == 30:
            raise OSError("disk full")
        return x

    with pytest.raises(CaseFailedError, match=r"^case n3: export failed: OSError: disk full$"):
        run_pipeline(list(range(6)), [f"n{i}" for i in range(6)], lambda i: i, lambda i: i * 10, failing_export,
                     num_preprocess=1, num_export=1)
    results, skipped = run_pipeline([0, 1, 2], ["a", "b", "c"],
                                    lambda i: (_ for _ in ()).throw(KeyError(i)) if i == 1 else i,
                                    lambda i: i, lambda i: i, num_preprocess=0, num_export=0, skip=(KeyError,))
    assert results == [0, 2] and [str(e) for e in skipped] == ["1"]
    with pytest.raises(ValueError, match="workers must be >= 0, got -1"):
        run_pipeline([0], ["a"], int, int, int, num_preprocess=-1)


def test_torch_export_hands_the_mask_back_instead_of_rereading_it(inputs, threshold, tmp_path, monkeypatch):
    import cc3d
    predictor = _predictor("on", threshold=threshold)

    def no_reread(*args, **kwargs):
        raise AssertionError("the exported mask was read back from disk although the export returned it")

    monkeypatch.setattr(predictor.plans_manager.image_reader_writer_class, "read_seg", no_reread)
    reports = predict_folder(predictor, str(inputs), str(tmp_path))
    masks = _masks(tmp_path)
    assert len(reports) == 3
    for r in reports:
        _, n = cc3d.connected_components(masks[r["case"]] > 0, connectivity=26, return_N=True)
        assert len(r["lesions"]) == n and sum(l["voxels"] for l in r["lesions"]) == (masks[r["case"]] > 0).sum()
