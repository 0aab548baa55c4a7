"""preprocess_case_torch against nnU-Net's DefaultPreprocessor on synthetic CT-like volumes (CPU).

The plans come from a real ``nnUNetv2_plan_and_preprocess --no_pp`` run on a tiny dataset (about 20 s once; the
result is kept in pytest's cache folder). Variants of those plans cover transposition, isotropic (non-separate)
resampling and masked z-score normalisation. test_torch_export.py reuses the helpers of this module.
"""
import copy
import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import gaussian_filter

from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from nnunetv2_gfscreen.torch_io import preprocessing as tp

DATASET = 'Dataset987_TinyCT'
# exact operators, float32 vs nnU-Net's float64: measured max abs diff <= 1e-6 (normalised units), mean <= 8e-8,
# 1 - correlation <= 7e-15 on these cases
MAX_ABS_TOL, MEAN_ABS_TOL, MIN_CORR = 1e-5, 1e-6, 1 - 1e-9
# name -> (array shape z,y,x as stored, spacing in numpy order, plans variant)
CASES = {
    'aniso': ((20, 70, 60), (2.5, 0.7, 0.7), 'as_planned'),
    'transposed': ((70, 60, 20), (0.7, 0.7, 2.5), 'transposed'),
    'iso_zscore_mask': ((30, 40, 36), (1.3, 1.1, 0.9), 'iso_zscore_mask'),
}


def synthetic_ct(shape, seed: int, body_axes=(1, 2)) -> np.ndarray:
    """int16 CT-like volume: air, an elliptic body with smooth texture, an organ, a bone rim, zeros outside."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing='ij')
    a, b = (grids[i] for i in body_axes)
    r = (a / 0.8) ** 2 + (b / 0.9) ** 2
    img = np.where(r < 1, 40.0, -1000.0) + gaussian_filter(rng.normal(size=shape), 1.5) * 150 * (r < 1)
    img[(r > 0.8) & (r < 1)] = 700
    img[a ** 2 + b ** 2 > 1.6] = 0  # outside the scanner's field of view: zero-valued corners inside the crop
    img[sum((g - c) ** 2 for g, c in zip(grids, (0.1, 0.2, -0.1))) < 0.1] += 90
    pad = [slice(None)] * 3
    pad[body_axes[0]] = slice(0, 4)
    img[tuple(pad)] = 0  # a zero border that crop_to_nonzero removes
    return img.astype(np.int16)


def write_image(array: np.ndarray, spacing_numpy_order, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing_numpy_order[::-1]))
    image.SetOrigin((12.5, -30.0, 4.0))
    sitk.WriteImage(image, str(path))


def _plan_tiny_dataset(folder: Path) -> None:
    raw = folder / 'raw' / DATASET
    (raw / 'imagesTr').mkdir(parents=True)
    (raw / 'labelsTr').mkdir()
    for i in range(2):
        img = synthetic_ct((20, 64, 56), seed=i)
        write_image(img, (3.0, 0.8, 0.8), raw / 'imagesTr' / f'c{i}_0000.nii.gz')
        write_image((img > -500).astype(np.uint8), (3.0, 0.8, 0.8), raw / 'labelsTr' / f'c{i}.nii.gz')
    (raw / 'dataset.json').write_text(json.dumps({'channel_names': {'0': 'CT'}, 'numTraining': 2,
                                                  'labels': {'background': 0, 'lesion': 1},
                                                  'file_ending': '.nii.gz'}))
    env = dict(os.environ, nnUNet_raw=str(folder / 'raw'), nnUNet_preprocessed=str(folder / 'pre'),
               nnUNet_results=str(folder / 'res'))
    cmd = [sys.executable, '-c', 'from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import '
           'plan_and_preprocess_entry as f; f()', '-d', DATASET[7:10], '-c', '3d_fullres', '-np', '1', '-npfp', '1',
           '--no_pp']
    subprocess.run(cmd, env=env, check=True, capture_output=True)


@pytest.fixture(scope='session')
def tiny_ct_plans(pytestconfig, tmp_path_factory) -> tuple:
    """(plans dict, dataset_json dict) of a real nnU-Net planning run, cached across pytest runs."""
    name = f"gfscreen_tiny_ct_plans_nnunetv2_{version('nnunetv2')}"
    cache = getattr(pytestconfig, 'cache', None)
    folder = Path(cache.mkdir(name)) if cache is not None else tmp_path_factory.mktemp(name)
    if not (folder / 'nnUNetPlans.json').is_file():
        work = tmp_path_factory.mktemp('plan_run')
        _plan_tiny_dataset(work)
        for f in ('dataset.json', 'nnUNetPlans.json'):
            (folder / f).write_text((work / 'pre' / DATASET / f).read_text())
    return (json.loads((folder / 'nnUNetPlans.json').read_text()),
            json.loads((folder / 'dataset.json').read_text()))


def plans_variant(plans: dict, variant: str) -> tuple:
    """(PlansManager, ConfigurationManager) for the real plans or an edited copy."""
    plans = copy.deepcopy(plans)
    cfg = plans['configurations']['3d_fullres']
    if variant == 'transposed':  # images stored with the low-resolution axis last
        plans['transpose_forward'], plans['transpose_backward'] = [2, 0, 1], [1, 2, 0]
    elif variant == 'iso_zscore_mask':
        cfg['spacing'] = [1.0, 1.0, 1.0]
        cfg['normalization_schemes'], cfg['use_mask_for_norm'] = ['ZScoreNormalization'], [True]
    elif variant != 'as_planned':
        raise ValueError(variant)
    pm = PlansManager(plans)
    return pm, pm.get_configuration('3d_fullres')


def make_case(name: str, folder: Path) -> Path:
    shape, spacing, _ = CASES[name]
    path = folder / f'{name}_0000.nii.gz'
    write_image(synthetic_ct(shape, seed=7, body_axes=(0, 1) if name == 'transposed' else (1, 2)), spacing, path)
    return path


def nnunet_preprocess(path: Path, pm, cm, dataset_json) -> tuple:
    data, _, props = DefaultPreprocessor(verbose=False).run_case([str(path)], None, pm, cm, dataset_json)
    return data, props


def torch_preprocess(path: Path, pm, cm, dataset_json, device='cpu') -> tuple:
    images, props = pm.image_reader_writer_class().read_images([str(path)])
    return tp.preprocess_case_torch(images, props, pm, cm, dataset_json, torch.device(device))


@pytest.mark.parametrize('name', sorted(CASES))
def test_matches_nnunet_preprocessing(name, tiny_ct_plans, tmp_path):
    plans, dataset_json = tiny_ct_plans
    pm, cm = plans_variant(plans, CASES[name][2])
    path = make_case(name, tmp_path)
    ref, ref_props = nnunet_preprocess(path, pm, cm, dataset_json)
    out, props = torch_preprocess(path, pm, cm, dataset_json)

    assert out.dtype == torch.float32 and out.device.type == 'cpu'
    assert tuple(out.shape) == ref.shape
    assert props == ref_props
    # the case is non-trivial: cropped and resampled
    assert props['shape_before_cropping'] != props['shape_after_cropping_and_before_resampling']
    assert props['shape_after_cropping_and_before_resampling'] != ref.shape[1:]
    diff = np.abs(out.numpy() - ref)
    corr = np.corrcoef(out.numpy().ravel(), ref.ravel())[0, 1]
    assert ref.std() > 0.1
    assert diff.max() < MAX_ABS_TOL and diff.mean() < MEAN_ABS_TOL and corr > MIN_CORR, (diff.max(), diff.mean())


def test_input_properties_not_modified_and_tensor_input(tiny_ct_plans, tmp_path):
    plans, dataset_json = tiny_ct_plans
    pm, cm = plans_variant(plans, 'as_planned')
    images, props = pm.image_reader_writer_class().read_images([str(make_case('aniso', tmp_path))])
    before = copy.deepcopy(props)
    out_np, _ = tp.preprocess_case_torch(images, props, pm, cm, dataset_json, torch.device('cpu'))
    out_t, _ = tp.preprocess_case_torch(torch.from_numpy(images), props, pm, cm, dataset_json, 'cpu')
    assert props == before
    assert torch.equal(out_np, out_t)


def test_oom_falls_back_to_cpu_with_warning(tiny_ct_plans, tmp_path, monkeypatch):
    plans, dataset_json = tiny_ct_plans
    pm, cm = plans_variant(plans, 'as_planned')
    path = make_case('aniso', tmp_path)
    expected, _ = torch_preprocess(path, pm, cm, dataset_json)
    calls, real = [], tp.resample_data_torch

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError('CUDA out of memory (simulated)')
        return real(*args, **kwargs)

    monkeypatch.setattr(tp, 'resample_data_torch', flaky)
    with pytest.warns(UserWarning, match='out of memory'):
        out, props = torch_preprocess(path, pm, cm, dataset_json)
    assert len(calls) == 2 and out.device.type == 'cpu'
    assert torch.equal(out, expected)


def test_resampler_matches_nnunet_for_other_orders_and_forced_separation():
    rng = np.random.default_rng(3)
    data = gaussian_filter(rng.normal(size=(2, 9, 23, 17)), (0, 1, 1, 1)).astype(np.float32) * 10
    for kwargs, new_shape in (({'order': 1, 'order_z': 1, 'force_separate_z': True}, (13, 15, 30)),
                              ({'order': 3, 'order_z': 0, 'force_separate_z': False}, (5, 31, 11)),
                              ({'order': 0, 'order_z': 0, 'force_separate_z': None}, (12, 20, 20))):
        ref = resample_data_or_seg_to_shape(data, new_shape, (3.0, 1.0, 1.0), (2.0, 1.2, 0.6), **kwargs)
        out, box = tp.resample_data_torch(torch.from_numpy(data), new_shape, (3.0, 1.0, 1.0), (2.0, 1.2, 0.6),
                                          **kwargs)
        assert box == [[0, n] for n in new_shape]
        np.testing.assert_allclose(out.numpy(), ref, atol=1e-4, rtol=0)


def test_resampler_sub_block_equals_part_of_full_result():
    data = torch.from_numpy(gaussian_filter(np.random.default_rng(4).normal(size=(1, 12, 30, 26)), 1.5)).float()
    full, _ = tp.resample_data_torch(data, (20, 25, 40), (2.0, 1.0, 1.0), (1.2, 1.2, 0.65), order=1, order_z=0)
    part, box = tp.resample_data_torch(data, (20, 25, 40), (2.0, 1.0, 1.0), (1.2, 1.2, 0.65), order=1, order_z=0,
                                       input_bbox=[[3, 7], [0, 10], [20, 26]])
    assert box[1][0] == 0 and box[2][1] == 40  # boxes touching the border stay at the border
    assert 0 < box[0][0] < box[0][1] < 20 and box[1][1] < 25 and box[2][0] > 0
    torch.testing.assert_close(part, full[:, box[0][0]:box[0][1], box[1][0]:box[1][1], box[2][0]:box[2][1]])


def test_bad_input_is_refused_with_the_bad_value(tiny_ct_plans):
    plans, dataset_json = tiny_ct_plans
    pm, cm = plans_variant(plans, 'as_planned')
    with pytest.raises(ValueError, match=r'\(20, 30\)'):
        tp.preprocess_case_torch(np.zeros((20, 30)), {'spacing': (1, 1)}, pm, cm, dataset_json, 'cpu')
    with pytest.raises(ValueError, match='spacing'):
        tp.preprocess_case_torch(np.zeros((1, 4, 4, 4)), {}, pm, cm, dataset_json, 'cpu')
    with pytest.raises(ValueError, match=r'\[\[0, 5\], \[0, 2\], \[3, 2\]\]'):
        tp.resample_data_torch(torch.zeros(1, 4, 4, 4), (5, 5, 5), (1, 1, 1), (1, 1, 1),
                               input_bbox=[[0, 5], [0, 2], [3, 2]])
