"""Groups for GRL: N sub-volumes from the same CT, drawn by nnU-Net's own loader and augmentation.

The group is GRPO's candidate set (METHOD.md): advantages are relative within one CT. nnU-Net's
`nnUNetDataLoader` already crops, pads, oversamples foreground and augments per sample; we only
change which case each batch slot reads and which slots are forced to contain lesion.
"""
import numpy as np
import torch

from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader


class GroupDataLoader(nnUNetDataLoader):
    """Batches of `groups_per_batch` CTs x `group_size` sub-volumes, group-major.

    Within every group the last round(group_size * lesion_share) slots are forced to contain
    foreground (nnU-Net's "oversample the last XX percent" rule, applied per group), so each group
    mixes lesion and non-lesion views and its rewards can differ. Healthy CTs fall back to random
    crops, as in nnU-Net. The batch dict gains `group_ids` (B,) long.
    """

    def __init__(self, data, group_size: int, groups_per_batch: int, patch_size, final_patch_size, label_manager,
                 lesion_share: float, transforms=None):
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2 for a group-relative advantage, got {group_size}")
        super().__init__(data, group_size * groups_per_batch, patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=lesion_share, sampling_probabilities=None, pad_sides=None,
                         probabilistic_oversampling=False, transforms=transforms)
        self.group_size = group_size
        self.groups_per_batch = groups_per_batch

    def get_indices(self):
        cases = np.random.choice(self.indices, self.groups_per_batch, replace=True)
        return [c for c in cases for _ in range(self.group_size)]

    def _oversample_last_XX_percent(self, sample_idx: int) -> bool:
        slot = sample_idx % self.group_size
        return not slot < round(self.group_size * (1 - self.oversample_foreground_percent))

    def generate_train_batch(self):
        batch = super().generate_train_batch()
        batch["group_ids"] = torch.arange(self.batch_size) // self.group_size
        return batch
