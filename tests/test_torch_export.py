"""export_logits_torch against nnU-Net's export_prediction_from_logits on synthetic cases (CPU).

Cases, plans and nnU-Net preprocessing come from the helpers of test_torch_preprocessing.py (loaded by path).
"""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import gaussian_filter

from nnunetv2.inference.export_prediction import export_prediction_from_logits
from nnunetv2_gfscreen.torch_io import export as te

_spec = importlib.util.spec_from_file_location('_torch_prepost_cases',
                                               Path(__file__).with_name('test_torch_preprocessing.py'))
cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cases)
tiny_ct_plans = cases.tiny_ct_plans  # the session fixture (its plans are cached on disk)

MIN_DICE = 0.99


def smooth_logits(shape, seed: int = 0) -> torch.Tensor:
    """(2, *shape) float32: background logit 0, foreground a smooth random field (about 30% positive)."""
    field = gaussian_filter(np.random.default_rng(seed).normal(size=shape), 2.0)
    field = (field - np.quantile(field, 0.7)) / field.std()
    return torch.from_numpy(np.stack([np.zeros(shape), 4 * field]).astype(np.float32))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def prepared_case(name: str, plans_and_json: tuple, folder: Path) -> tuple:
    plans, dataset_json = plans_and_json
    pm, cm = cases.plans_variant(plans, cases.CASES[name][2])
    data, props = cases.nnunet_preprocess(cases.make_case(name, folder), pm, cm, dataset_json)
    return pm, cm, dataset_json, props, smooth_logits(data.shape[1:])


def nnunet_export(logits: torch.Tensor, props: dict, pm, cm, dataset_json, folder: Path) -> np.ndarray:
    export_prediction_from_logits(logits.clone(), dict(props), cm, pm, dataset_json, str(folder / 'ref'), False, 1)
    return sitk.GetArrayFromImage(sitk.ReadImage(str(folder / 'ref.nii.gz')))


def mapped_box(props: dict, pm, cm, pre_shape, covered_bbox) -> np.ndarray:
    """Hand-computed mask of original voxels whose interpolation reads covered_bbox (original array order).

    Export resamples preprocessed -> cropped original with nnU-Net's pixel-centre map u = s * (o + 0.5) - 0.5,
    s = n_pre / n_orig: linear axes read floor(u) and floor(u) + 1 (weight > 0), so they touch [a, b) iff
    a - 1 < u < b; the separate low-resolution axis (order_z 0) reads round(u) clipped to the volume."""
    target = props['shape_after_cropping_and_before_resampling']
    lowres_axis = int(np.argmax(cm.spacing)) if max(cm.spacing) / min(cm.spacing) > 3 else None
    mask = np.zeros(props['shape_before_cropping'], dtype=bool)
    slices = []
    for d, ((a, b), n_orig, n_pre, (crop0, _)) in enumerate(zip(covered_bbox, target, pre_shape,
                                                                props['bbox_used_for_cropping'])):
        u = n_pre / n_orig * (np.arange(n_orig) + 0.5) - 0.5
        if d == lowres_axis:
            hit = (np.clip(np.floor(u + 0.5), 0, n_pre - 1) >= a) & (np.clip(np.floor(u + 0.5), 0, n_pre - 1) < b)
        else:
            hit = (u > a - 1) & (u < b)
        idx = np.flatnonzero(hit)
        slices.append(slice(crop0 + idx[0], crop0 + idx[-1] + 1))
    mask[tuple(slices)] = True
    return mask.transpose(pm.transpose_backward)


@pytest.mark.parametrize('name', sorted(cases.CASES))
def test_matches_nnunet_export(name, tiny_ct_plans, tmp_path):
    pm, cm, dataset_json, props, logits = prepared_case(name, tiny_ct_plans, tmp_path)
    ref = nnunet_export(logits, props, pm, cm, dataset_json, tmp_path)
    seg = te.export_logits_torch(logits, props, pm, cm, dataset_json, str(tmp_path / 'mine'))

    ref_img, mine_img = sitk.ReadImage(str(tmp_path / 'ref.nii.gz')), sitk.ReadImage(str(tmp_path / 'mine.nii.gz'))
    for attr in ('GetSize', 'GetSpacing', 'GetOrigin', 'GetDirection'):
        assert getattr(mine_img, attr)() == getattr(ref_img, attr)()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mine_img), seg)
    assert seg.dtype == np.uint8 and seg.shape == cases.CASES[name][0]
    assert 0.1 < (ref == 1).mean() < 0.6
    assert dice(seg == 1, ref == 1) >= MIN_DICE
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f'{name}_0000.nii.gz', 'mine.nii.gz', 'ref.nii.gz'])


@pytest.mark.parametrize('name', ['aniso', 'transposed'])
def test_covered_bbox_resamples_only_the_covered_part(name, tiny_ct_plans, tmp_path):
    pm, cm, dataset_json, props, logits = prepared_case(name, tiny_ct_plans, tmp_path)
    box = [[3, 12], [10, 40], [0, 30]]
    gated = torch.zeros_like(logits)  # rejected tiles abstain with zero logits -> background
    gated[:, 3:12, 10:40, 0:30] = logits[:, 3:12, 10:40, 0:30]
    ref = nnunet_export(gated, props, pm, cm, dataset_json, tmp_path)
    seg = te.export_logits_torch(gated, props, pm, cm, dataset_json, None, covered_bbox=box)
    inside = mapped_box(props, pm, cm, logits.shape[1:], box)

    assert 0.05 < inside.mean() < 0.5  # the box is a real sub-block
    assert (ref == 1)[inside].sum() > 100 and not (ref == 1)[~inside].any()
    assert not seg[~inside].any()
    assert dice(seg[inside] == 1, ref[inside] == 1) >= MIN_DICE


def test_without_output_file_nothing_is_written(tiny_ct_plans, tmp_path):
    pm, cm, dataset_json, props, logits = prepared_case('aniso', tiny_ct_plans, tmp_path)
    files = sorted(tmp_path.iterdir())
    seg = te.export_logits_torch(logits, props, pm, cm, dataset_json, None)
    assert sorted(tmp_path.iterdir()) == files and seg.shape == cases.CASES['aniso'][0]
    empty = te.export_logits_torch(logits, props, pm, cm, dataset_json, None, covered_bbox=[[0, 0], [0, 5], [0, 5]])
    assert empty.shape == seg.shape and not empty.any()


def test_oom_falls_back_to_cpu_with_warning(tiny_ct_plans, tmp_path, monkeypatch):
    pm, cm, dataset_json, props, logits = prepared_case('aniso', tiny_ct_plans, tmp_path)
    expected = te.export_logits_torch(logits, props, pm, cm, dataset_json, None)
    calls, real = [], te.resample_data_torch

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError('CUDA out of memory (simulated)')
        return real(*args, **kwargs)

    monkeypatch.setattr(te, 'resample_data_torch', flaky)
    with pytest.warns(UserWarning, match='out of memory'):
        seg = te.export_logits_torch(logits, props, pm, cm, dataset_json, str(tmp_path / 'out'))
    assert len(calls) == 2
    np.testing.assert_array_equal(seg, expected)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / 'out.nii.gz'))), expected)


def test_bad_input_is_refused_with_the_bad_value(tiny_ct_plans, tmp_path):
    pm, cm, dataset_json, props, logits = prepared_case('aniso', tiny_ct_plans, tmp_path)
    with pytest.raises(ValueError, match=r'\(3, 17, 58, 52\)'):
        te.export_logits_torch(torch.zeros(3, 17, 58, 52), props, pm, cm, dataset_json, None)
    with pytest.raises(ValueError, match=r'\[\[0, 18\]'):
        te.export_logits_torch(logits, props, pm, cm, dataset_json, None, covered_bbox=[[0, 18], [0, 5], [0, 5]])


def test_label_map_equals_argmax_with_ties_to_the_lower_label(tiny_ct_plans):
    pm, _ = cases.plans_variant(tiny_ct_plans[0], 'as_planned')
    label_manager = pm.get_label_manager(tiny_ct_plans[1])
    logits = torch.from_numpy(np.random.default_rng(5).integers(-2, 3, size=(4, 6, 7, 8)).astype(np.float32))
    labels = te._logits_to_segmentation(logits, label_manager)
    np.testing.assert_array_equal(labels.numpy(), np.argmax(logits.numpy(), 0))
    assert (labels == 0).any() and (labels == 3).any()
