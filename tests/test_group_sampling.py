import numpy as np
import pytest
import torch

from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from nnunetv2_gfscreen.trainers.group_sampling import GroupDataLoader, centre_crop


@pytest.fixture(scope="module")
def loader_parts(planned_dataset):
    import json
    pm = PlansManager(str(planned_dataset["plans_file"]))
    dataset_json = json.loads((planned_dataset["dataset_folder"] / "dataset.json").read_text())
    folder = planned_dataset["dataset_folder"] / "nnUNetPlans_3d_fullres"
    ds = infer_dataset_class(str(folder))(str(folder))
    return ds, pm.get_label_manager(dataset_json)


def test_groups_come_from_one_ct_each_with_lesion_share(loader_parts):
    ds, lm = loader_parts
    np.random.seed(0)
    dl = GroupDataLoader(ds, group_size=6, groups_per_batch=3, patch_size=(16, 48, 48), final_patch_size=(16, 48, 48),
                         label_manager=lm, lesion_share=0.5)
    lesion_seen = 0
    for _ in range(4):
        batch = dl.generate_train_batch()
        assert batch["data"].shape == (18, 1, 16, 48, 48)
        assert batch["group_ids"].tolist() == [g for g in range(3) for _ in range(6)]
        keys = np.array(batch["keys"]).reshape(3, 6)
        assert (keys == keys[:, :1]).all(), "a group mixes CTs"
        has_lesion = (batch["target"] > 0).flatten(1).any(1).reshape(3, 6)
        for g in range(3):
            _, _, _, props = ds.load_case(keys[g, 0])
            if len(props["class_locations"][1]):
                # the last 3 of 6 slots are forced onto lesion voxels in CTs that have lesions
                assert has_lesion[g, 3:].all()
                lesion_seen += 1
    assert lesion_seen > 0


def test_group_of_one_is_refused(loader_parts):
    ds, lm = loader_parts
    with pytest.raises(ValueError, match="group_size"):
        GroupDataLoader(ds, 1, 2, (16, 48, 48), (16, 48, 48), lm, 0.5)


class _Mark:
    """A transform that records it ran by offsetting the image (and centre-crops to `crop` if given)."""

    def __init__(self, offset: float, crop=None):
        self.offset, self.crop = offset, crop

    def __call__(self, image, segmentation):
        if self.crop is not None:
            image, segmentation = centre_crop(image, self.crop), centre_crop(segmentation, self.crop)
        return {"image": image + self.offset, "segmentation": segmentation}


def test_only_focus_slots_get_full_augmentation(loader_parts):
    ds, lm = loader_parts
    np.random.seed(1)
    # initial patch larger than the final one, as nnU-Net's rotation margin makes it
    dl = GroupDataLoader(ds, group_size=6, groups_per_batch=2, patch_size=(20, 64, 64), final_patch_size=(16, 48, 48),
                         label_manager=lm, lesion_share=0.5, transforms=_Mark(1000.0, crop=(16, 48, 48)),
                         light_transforms=_Mark(-1000.0),
                         focus_slots=3)
    chosen = np.zeros(12)
    for _ in range(6):
        batch = dl.generate_train_batch()
        focus = batch["focus_slots"]
        assert focus.dtype == torch.bool and int(focus.sum()) == 3
        assert batch["data"].shape == (12, 1, 16, 48, 48)
        offsets = batch["data"].flatten(1).mean(1)
        assert (offsets[focus] > 500).all() and (offsets[~focus] < -500).all()
        chosen += focus.numpy()
    assert (chosen > 0).sum() >= 8, "focus slots are not drawn at random across the batch"


def test_light_slots_are_centre_crops_of_the_case(loader_parts):
    ds, lm = loader_parts
    np.random.seed(2)
    dl = GroupDataLoader(ds, group_size=4, groups_per_batch=1, patch_size=(24, 64, 64), final_patch_size=(16, 48, 48),
                         label_manager=lm, lesion_share=0.5,
                         transforms=lambda image, segmentation: {"image": image[:, 4:20, 8:56, 8:56],
                                                                 "segmentation": segmentation[:, 4:20, 8:56, 8:56]},
                         light_transforms=lambda image, segmentation: {"image": image, "segmentation": segmentation},
                         focus_slots=1)
    batch = dl.generate_train_batch()
    data, seg, _, _ = ds.load_case(batch["keys"][0])
    data, seg = np.asarray(data[0]), np.asarray(seg[0])
    for j in np.flatnonzero(~batch["focus_slots"].numpy()):
        crop = batch["data"][j, 0].numpy()
        # an unaugmented crop is a block of the case (or padding): find it by its first interior voxel
        hits = np.argwhere(np.isclose(data, crop[8, 24, 24]))
        assert any(np.array_equal(data[z - 8:z + 8, y - 24:y + 24, x - 24:x + 24], crop)
                   and np.array_equal(seg[z - 8:z + 8, y - 24:y + 24, x - 24:x + 24], batch["target"][j, 0].numpy())
                   for z, y, x in hits if z >= 8 and y >= 24 and x >= 24), f"slot {j} is not an unaltered crop"


def test_light_transforms_need_full_ones(loader_parts):
    ds, lm = loader_parts
    with pytest.raises(ValueError, match="light_transforms"):
        GroupDataLoader(ds, 4, 1, (16, 48, 48), (16, 48, 48), lm, 0.5, transforms=None, light_transforms=_Mark(0))
    with pytest.raises(ValueError, match="focus_slots"):
        GroupDataLoader(ds, 4, 1, (16, 48, 48), (16, 48, 48), lm, 0.5, focus_slots=5)
