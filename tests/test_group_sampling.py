import numpy as np
import pytest
import torch

from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from nnunetv2_gfscreen.trainers.group_sampling import GroupDataLoader


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
