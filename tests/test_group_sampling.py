import json

import numpy as np
import pytest
import torch

from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from nnunetv2_gfscreen.trainers.group_sampling import GroupDataLoader, centre_crop


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


def test_groups_come_from_one_ct_each_with_lesion_share(loader_parts):
    ds, lm = loader_parts
    np.random.seed(0)
    dl = _loader(ds, lm)
    lesion_seen = 0
    for _ in range(4):
        groups = dl.generate_groups()
        assert groups["group_data"].shape == (18, 1, 16, 48, 48)
        assert groups["group_target"].shape == (18, 1, 16, 48, 48)
        assert groups["group_ids"].tolist() == [g for g in range(3) for _ in range(6)]
        has_lesion = (groups["group_target"] > 0).flatten(1).any(1).reshape(3, 6)
        for g, key in enumerate(groups["group_keys"]):
            _, _, _, props = ds.load_case(key)
            if len(props["class_locations"][1]):
                # the last 3 of 6 slots are forced onto lesion voxels in CTs that have lesions
                assert has_lesion[g, 3:].all()
                lesion_seen += 1
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


def test_group_slots_are_unaltered_centre_crops_of_the_case(loader_parts):
    ds, lm = loader_parts
    np.random.seed(2)
    # initial patch larger than the final one, as nnU-Net's rotation margin makes it
    dl = _loader(ds, lm, patch_size=(24, 64, 64), group_size=4, groups_per_batch=1)
    groups = dl.generate_groups()
    data, seg, _, _ = ds.load_case(groups["group_keys"][0])
    data, seg = np.asarray(data[0]), np.asarray(seg[0])
    for j in range(4):
        crop = groups["group_data"][j, 0].numpy()
        # the crop lies inside the case (the centre of the padded initial patch): find it by one interior voxel
        hits = np.argwhere(np.isclose(data, crop[8, 24, 24]))
        assert any(np.array_equal(data[z - 8:z + 8, y - 24:y + 24, x - 24:x + 24], crop)
                   and np.array_equal(seg[z - 8:z + 8, y - 24:y + 24, x - 24:x + 24], groups["group_target"][j, 0].numpy())
                   for z, y, x in hits if z >= 8 and y >= 24 and x >= 24), f"slot {j} is not an unaltered crop"


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
