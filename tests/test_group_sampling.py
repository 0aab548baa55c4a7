import json

import numpy as np
import pytest
import torch

from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from nnunetv2_gfscreen.trainers.group_sampling import (GroupDataLoader, central_region, centre_crop, holds_lesion,
                                                       shifted_grid, tiles_with_lesion)


@pytest.fixture(scope="module")
def loader_parts(planned_dataset):
    pm = PlansManager(str(planned_dataset["plans_file"]))
    dataset_json = json.loads((planned_dataset["dataset_folder"] / "dataset.json").read_text())
    folder = planned_dataset["dataset_folder"] / "nnUNetPlans_3d_fullres"
    ds = infer_dataset_class(str(folder))(str(folder))
    return ds, pm.get_label_manager(dataset_json)


def _loader(ds, lm, **kw):
    args = dict(batch_size=2, patch_size=(16, 48, 48), final_patch_size=(16, 48, 48), label_manager=lm,
                oversample_foreground_percent=0.33, group_size=6, groups_per_batch=3, lesion_share=0.5)
    return GroupDataLoader(ds, **{**args, **kw})


class _Mark:
    """A transform that records it ran by offsetting the image."""

    def __init__(self, offset: float):
        self.offset = offset

    def __call__(self, image, segmentation):
        return {"image": image + self.offset, "segmentation": segmentation}


@pytest.mark.parametrize("per_lesion", [True, False])
def test_groups_come_from_one_ct_each_with_lesion_share(loader_parts, per_lesion):
    ds, lm = loader_parts
    np.random.seed(0)
    dl = _loader(ds, lm, per_lesion=per_lesion)
    lesion_seen = 0
    for _ in range(4):
        groups = dl.generate_groups()
        assert groups["group_data"].shape == (18, 1, 16, 48, 48)
        assert groups["group_target"].shape == (18, 1, 16, 48, 48)
        assert groups["group_ids"].tolist() == [g for g in range(3) for _ in range(6)]
        label = groups["group_lesion"].reshape(3, 6)
        for g, key in enumerate(groups["group_keys"]):
            _, _, _, props = ds.load_case(key)
            if len(props["class_locations"][1]):
                # the last 3 of 6 slots come from grid tiles whose central region holds lesion
                assert (label[g, 3:] == 1).all()
                lesion_seen += 1
            else:
                assert (label[g] == 0).all()
    assert lesion_seen > 0


def test_focus_batch_is_nnunets_and_groups_get_their_own_transforms(loader_parts):
    ds, lm = loader_parts
    np.random.seed(1)
    dl = _loader(ds, lm, transforms=_Mark(1000.0), group_transforms=_Mark(-1000.0))
    batch = dl.generate_train_batch()
    # nnU-Net's batch: batch_size patches with nnU-Net's transforms, keys drawn by nnU-Net's sampler
    assert batch["data"].shape == (2, 1, 16, 48, 48) and len(batch["keys"]) == 2
    assert (batch["data"].flatten(1).mean(1) > 500).all()
    assert (batch["group_data"].flatten(1).mean(1) < -500).all()


def test_group_slots_are_tiles_of_one_shifted_sliding_window_grid(loader_parts):
    ds, lm = loader_parts
    np.random.seed(2)
    patch = (16, 48, 48)
    # initial patch larger than the final one, as nnU-Net's rotation margin makes it: the group ignores it
    dl = _loader(ds, lm, patch_size=(24, 64, 64), group_size=8, groups_per_batch=1)
    for _ in range(3):
        groups = dl.generate_groups()
        data, seg, _, _ = ds.load_case(groups["group_keys"][0])
        data, seg = np.asarray(data), np.asarray(seg)
        shape = data.shape[1:]
        steps = compute_steps_for_sliding_window(tuple(max(s, p) for s, p in zip(shape, patch)), patch, 0.5)
        offsets = [None, None, None]     # per axis, the offsets every slot so far agrees with
        for j, start in enumerate(groups["group_starts"]):
            bbox = [[s, s + p] for s, p in zip(start, patch)]
            assert np.array_equal(crop_and_pad_nd(data, bbox, 0), groups["group_data"][j].numpy())
            target = crop_and_pad_nd(seg, bbox, -1)
            assert np.array_equal(target, groups["group_target"][j].numpy())   # -1 outside: the trainer's transforms clear it
            # one offset for the whole grid, at most half a step (the step is half a patch) per axis; a start
            # half a step from two grid points fits two offsets, so the slots must share one of their candidates
            for a in range(3):
                cands = {start[a] - s for s in steps[a] if abs(start[a] - s) <= patch[a] // 4}
                assert cands, f"slot {j} axis {a}: start {start[a]} is not on the grid {steps[a]} +- a quarter patch"
                offsets[a] = cands if offsets[a] is None else offsets[a] & cands
            region = central_region(start, patch, shape)
            local = tuple(slice(lo - s, hi - s) for (lo, hi), s in zip(region, start))
            assert groups["group_lesion"][j].item() == float((target[(slice(None),) + local] > 0).any())
        assert all(offsets), offsets


@pytest.mark.parametrize("mirror", [False, True])
def test_group_source_marks_exactly_the_repeated_crops(loader_parts, mirror):
    """More lesion slots than lesion tiles repeat crops; `group_source` points each repeat at its first copy
    (same group, start, mirroring), and no two slots it calls distinct hold the same crop."""
    ds, lm = loader_parts
    np.random.seed(3)
    dl = _loader(ds, lm, group_size=12, lesion_share=0.75, groups_per_batch=2,
                 group_transforms=MirrorTransform((0, 1, 2)) if mirror else None)
    repeats = 0
    for _ in range(3):
        groups = dl.generate_groups()
        data, target, source = groups["group_data"], groups["group_target"], groups["group_source"]
        assert torch.equal(groups["group_lesion_anywhere"], holds_lesion(target, lm.ignore_label))
        for i in range(len(source)):
            j = int(source[i])
            same = torch.equal(data[i], data[j]) and torch.equal(target[i], target[j])
            assert j <= i and same and groups["group_ids"][i] == groups["group_ids"][j]
            assert groups["group_starts"][i] == groups["group_starts"][j]
            if j == i:
                assert not any(torch.equal(data[i], data[k]) and torch.equal(target[i], target[k])
                               for k in range(i) if groups["group_ids"][k] == groups["group_ids"][i])
            repeats += j != i
    assert repeats > 0


@pytest.mark.parametrize("mirror", [False, True])
def test_dense_weights_give_each_lesion_of_a_tile_weight_one(loader_parts, mirror):
    from nnunetv2_gfscreen.core.lesions import label_lesions
    ds, lm = loader_parts
    np.random.seed(4)
    dense_shape = (4, 12, 12)
    dl = _loader(ds, lm, group_size=8, groups_per_batch=3, dense_shape=dense_shape,
                 group_transforms=MirrorTransform((0, 1, 2)) if mirror else None)
    weighted = 0
    for _ in range(2):
        groups = dl.generate_groups()
        w = groups["group_dense_weight"]
        assert w.shape == (24, 1, *dense_shape)
        target_map = torch.nn.functional.adaptive_max_pool3d((groups["group_target"] > 0).float(), dense_shape)
        assert torch.equal(w > 0, target_map > 0)                 # weighted exactly where the map's target is lesion
        for i, start in enumerate(groups["group_starts"]):
            seg = np.asarray(ds.load_case(groups["group_keys"][i // 8])[1])[0]
            labels, _ = label_lesions(seg > 0)
            crop = crop_and_pad_nd(labels[None], [[s, s + p] for s, p in zip(start, (16, 48, 48))], 0)
            n_lesions = len(set(np.unique(crop).tolist()) - {0})   # mirroring keeps the count
            assert w[i].sum().item() == pytest.approx(n_lesions, abs=1e-4)
            weighted += n_lesions > 0
    assert weighted > 0


def test_grid_shift_central_regions_and_lesion_tiles():
    class Fixed:
        def __init__(self, v):
            self.v = v

        def randint(self, lo, hi):
            assert lo == -self.bound and hi == self.bound + 1
            return self.v
    rng = Fixed(0)
    rng.bound = 2      # half a step: the step is half the patch
    # 16 voxels per axis with a patch of 8 and step 0.5: nnU-Net's starts are 0, 4, 8
    assert shifted_grid((16, 16, 16), (8, 8, 8), 0.5, rng)[:4] == [(0, 0, 0), (0, 0, 4), (0, 0, 8), (0, 4, 0)]
    rng.v = -2
    starts = shifted_grid((16, 16, 16), (8, 8, 8), 0.5, rng)
    assert len(starts) == 27 and starts[0] == (-2, -2, -2) and starts[-1] == (6, 6, 6)
    # central region: the middle half, untrimmed where the tile reaches the border
    assert central_region((4, 4, 4), (8, 8, 8), (16, 16, 16)) == [(6, 10)] * 3
    assert central_region((-3, 8, 4), (8, 8, 8), (16, 16, 16)) == [(-3, 3), (10, 16), (6, 10)]
    # a lesion voxel at (7, 7, 7) lies in the central region of the tile at 4 only; at (1, 1, 1) in the border tile
    starts = [(0, 0, 0), (4, 4, 4), (8, 8, 8)]
    assert tiles_with_lesion(starts, (8, 8, 8), (16, 16, 16), np.array([[7, 7, 7]])).tolist() == [False, True, False]
    assert tiles_with_lesion(starts, (8, 8, 8), (16, 16, 16), np.array([[1, 1, 1]])).tolist() == [True, False, False]
    assert tiles_with_lesion(starts, (8, 8, 8), (16, 16, 16), np.zeros((0, 3), int)).tolist() == [False] * 3


def test_centre_crop_and_bad_arguments(loader_parts):
    ds, lm = loader_parts
    x = torch.arange(2 * 4 * 6 * 6).reshape(2, 4, 6, 6)
    assert torch.equal(centre_crop(x, (2, 2, 4)), x[:, 1:3, 2:4, 1:5])
    with pytest.raises(ValueError, match="cannot crop"):
        centre_crop(x, (5, 2, 2))
    with pytest.raises(ValueError, match="group_size"):
        _loader(ds, lm, group_size=1)
    with pytest.raises(ValueError, match="lesion_share"):
        _loader(ds, lm, lesion_share=1.5)
    dl = _loader(ds, lm, group_transforms=lambda image, segmentation: {"image": image, "segmentation": [segmentation]})
    with pytest.raises(ValueError, match="full-resolution"):
        dl.generate_groups()
