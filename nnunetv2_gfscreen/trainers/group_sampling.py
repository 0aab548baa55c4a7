"""Training batches for GF-Screen: nnU-Net's own Focus batch, plus groups of sub-volumes per CT for GRL.

The group is GRPO's candidate set (METHOD.md): advantages are relative within one CT, so a group
is `group_size` sub-volumes of one CT. The Focus only needs a prediction on them (for the rewards),
not a gradient, so the Focus's gradient batch is drawn separately and exactly as nnU-Net draws it
(its `nnUNetDataLoader.generate_train_batch`: batch_size patches from different CTs, its
foreground oversampling, its full augmentation). Taking the Focus's batch out of one group instead
(our first version) gave the Focus one CT per step and fewer lesion patches than nnU-Net (2 of 16
slots at lesion share 0.33: 31% forced-lesion patches against nnU-Net's 50%), and augmenting all
16 group slots cost 8x nnU-Net's data-loading CPU time per step (docs/results.md).

Group slots are cropped as nnU-Net crops (its bounding-box and oversampling logic, centre-cropped
from the initial to the final patch size, which is what nnU-Net's spatial transform does when it
draws no rotation or scaling) and get `group_transforms` (the trainer's: mirroring and label
clean-up), i.e. they look like the tiles the Glance scores at inference.
"""
from typing import Optional

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader


def centre_crop(x: torch.Tensor, size) -> torch.Tensor:
    """Central `size` crop of the trailing spatial axes of x (C, *spatial); size <= x's spatial shape.

    The same centre as the group loader's crop (see GroupDataLoader._group_sample), for patches in memory."""
    spatial = x.shape[1:]
    if len(size) != len(spatial) or any(s < p for s, p in zip(spatial, size)):
        raise ValueError(f"cannot crop {tuple(size)} from a patch of {tuple(spatial)}")
    return x[(slice(None),) + tuple(slice((s - p) // 2, (s - p) // 2 + p) for s, p in zip(spatial, size))]


class GroupDataLoader(nnUNetDataLoader):
    """nnU-Net's loader (its batch unchanged, for the Focus) that also draws GRL groups.

    Each batch dict holds nnU-Net's `data`, `target`, `keys`, plus:
      - `group_data` (G*N, C, *final_patch_size) float32: `groups_per_batch` CTs x `group_size` sub-volumes,
        group-major; within a group the last round(N * lesion_share) slots are forced onto lesion (nnU-Net's
        "oversample the last XX percent" rule per group), so rewards can differ; healthy CTs give random crops;
      - `group_target` (G*N, 1, *final_patch_size) int16, full resolution only (rewards and lesion labels);
      - `group_ids` (G*N,) long; `group_keys`, the CT of each group.
    """

    def __init__(self, data, batch_size: int, patch_size, final_patch_size, label_manager,
                 oversample_foreground_percent: float, group_size: int, groups_per_batch: int, lesion_share: float,
                 transforms=None, group_transforms=None, probabilistic_oversampling: bool = False):
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2 for a group-relative advantage, got {group_size}")
        if groups_per_batch < 1:
            raise ValueError(f"groups_per_batch must be >= 1, got {groups_per_batch}")
        if not 0.0 <= lesion_share <= 1.0:
            raise ValueError(f"lesion_share must be in [0, 1], got {lesion_share}")
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=oversample_foreground_percent, sampling_probabilities=None,
                         pad_sides=None, probabilistic_oversampling=probabilistic_oversampling, transforms=transforms)
        if self.patch_size_was_2d:
            raise NotImplementedError("GroupDataLoader supports 3D patches only")
        self.group_size = group_size
        self.groups_per_batch = groups_per_batch
        self.lesion_share = lesion_share
        self.group_transforms = group_transforms

    def group_slot_forced(self, slot: int) -> bool:
        """Whether group slot `slot` (0 .. group_size-1) must contain lesion: the last round(N * share) slots."""
        return not slot < round(self.group_size * (1 - self.lesion_share))

    def _group_sample(self, data, seg, properties, slot: int):
        bbox_lbs, bbox_ubs = self.get_bbox(data.shape[1:], self.group_slot_forced(slot), properties['class_locations'])
        # the centre of nnU-Net's (initial-size) box, read directly: nothing outside the final patch is loaded
        bbox = [[lo + (hi - lo - p) // 2, lo + (hi - lo - p) // 2 + p]
                for lo, hi, p in zip(bbox_lbs, bbox_ubs, self.final_patch_size)]
        image = torch.from_numpy(crop_and_pad_nd(data, bbox, 0)).float()
        segmentation = torch.from_numpy(crop_and_pad_nd(seg, bbox, -1, cast_cropped_to=np.int16)).to(torch.int16)
        if self.group_transforms is not None:
            out = self.group_transforms(**{'image': image, 'segmentation': segmentation})
            image, segmentation = out['image'], out['segmentation']
        if isinstance(segmentation, (list, tuple)):
            raise ValueError("group_transforms must return the full-resolution segmentation only "
                             "(no deep-supervision list)")
        return image, segmentation

    def generate_groups(self, cases: Optional[np.ndarray] = None) -> dict:
        """The groups of one batch (see the class docstring); `cases` fixes their CTs (else drawn at random)."""
        if cases is None:
            cases = np.random.choice(self.indices, self.groups_per_batch, replace=True)
        n = self.group_size * len(cases)
        group_data = group_target = None
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            for g, key in enumerate(cases):
                data, seg, seg_prev, properties = self._data.load_case(key)   # once per group
                if seg_prev is not None:
                    raise NotImplementedError("GroupDataLoader does not support cascaded data")
                for slot in range(self.group_size):
                    image, segmentation = self._group_sample(data, seg, properties, slot)
                    if group_data is None:
                        group_data = torch.empty((n, *image.shape), dtype=torch.float32)
                        group_target = torch.empty((n, *segmentation.shape), dtype=segmentation.dtype)
                    group_data[g * self.group_size + slot] = image
                    group_target[g * self.group_size + slot] = segmentation
        return {'group_data': group_data, 'group_target': group_target, 'group_keys': list(cases),
                'group_ids': torch.arange(n) // self.group_size}

    def generate_train_batch(self):
        batch = super().generate_train_batch()   # nnU-Net's Focus batch, unchanged
        batch.update(self.generate_groups())
        return batch
