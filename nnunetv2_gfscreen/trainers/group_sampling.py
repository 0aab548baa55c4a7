"""Groups for GRL: N sub-volumes from the same CT, drawn by nnU-Net's own loader and augmentation.

The group is GRPO's candidate set (METHOD.md): advantages are relative within one CT. nnU-Net's
`nnUNetDataLoader` already crops, pads and oversamples foreground per sample; we change which case
each batch slot reads, which slots are forced to contain lesion, and which slots get nnU-Net's full
augmentation.

Why not augment every slot: a group is group_size (16) sub-volumes where nnU-Net's batch is 2, and
nnU-Net's training transforms cost about 0.35 CPU-seconds per 48x224x192 patch (docs/results.md),
so augmenting all of them multiplies the data loaders' work by 8 and starves the GPU. Only the
`batch_size` slots that the Focus trains on need nnU-Net's augmentation; the others are only
predicted (for their rewards) and scored by the Glance, and get the cheap `light_transforms`
instead (crop plus, in the trainer, mirroring), which is also how inference sees tiles.
"""
from typing import Optional

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader


def centre_crop(x: torch.Tensor, size) -> torch.Tensor:
    """Central `size` crop of the trailing spatial axes of x (C, *spatial); size <= x's spatial shape."""
    spatial = x.shape[1:]
    if any(s < p for s, p in zip(spatial, size)):
        raise ValueError(f"cannot crop {tuple(size)} from a patch of {tuple(spatial)}")
    return x[(slice(None),) + tuple(slice((s - p) // 2, (s - p) // 2 + p) for s, p in zip(spatial, size))]


class GroupDataLoader(nnUNetDataLoader):
    """Batches of `groups_per_batch` CTs x `group_size` sub-volumes, group-major.

    Within every group the last round(group_size * lesion_share) slots are forced to contain
    foreground (nnU-Net's "oversample the last XX percent" rule, applied per group), so each group
    mixes lesion and non-lesion views and its rewards can differ. Healthy CTs fall back to random
    crops, as in nnU-Net. Each CT is opened once per group.

    `focus_slots` slots per batch, drawn at random, get `transforms` (nnU-Net's training
    augmentation); with `light_transforms` given, the other slots are centre-cropped from the
    loader's larger initial patch to `final_patch_size` (what nnU-Net's spatial transform does when
    it draws no rotation or scaling) and get `light_transforms`. Without `light_transforms` every
    slot gets `transforms`.

    The batch dict gains `group_ids` (B,) long and `focus_slots` (B,) bool.
    """

    def __init__(self, data, group_size: int, groups_per_batch: int, patch_size, final_patch_size, label_manager,
                 lesion_share: float, transforms=None, light_transforms=None, focus_slots: Optional[int] = None):
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2 for a group-relative advantage, got {group_size}")
        super().__init__(data, group_size * groups_per_batch, patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=lesion_share, sampling_probabilities=None, pad_sides=None,
                         probabilistic_oversampling=False, transforms=transforms)
        if self.patch_size_was_2d:
            raise NotImplementedError("GroupDataLoader supports 3D patches only")
        if light_transforms is not None and transforms is None:
            raise ValueError("light_transforms need transforms for the Focus slots")
        self.group_size = group_size
        self.groups_per_batch = groups_per_batch
        self.light_transforms = light_transforms
        self.num_focus_slots = self.batch_size if focus_slots is None else int(focus_slots)
        if not 1 <= self.num_focus_slots <= self.batch_size:
            raise ValueError(f"focus_slots must be in [1, {self.batch_size}], got {focus_slots}")

    def get_indices(self):
        cases = np.random.choice(self.indices, self.groups_per_batch, replace=True)
        return [c for c in cases for _ in range(self.group_size)]

    def _oversample_last_XX_percent(self, sample_idx: int) -> bool:
        slot = sample_idx % self.group_size
        return not slot < round(self.group_size * (1 - self.oversample_foreground_percent))

    def draw_focus_slots(self) -> torch.Tensor:
        """(B,) bool: the slots the Focus trains on, drawn uniformly, so their lesion share matches the groups'."""
        focus = torch.zeros(self.batch_size, dtype=torch.bool)
        focus[torch.from_numpy(np.random.choice(self.batch_size, self.num_focus_slots, replace=False))] = True
        return focus

    def _sample(self, data, seg, properties, slot: int, full: bool):
        bbox_lbs, bbox_ubs = self.get_bbox(data.shape[1:], self.get_do_oversample(slot), properties['class_locations'])
        bbox = [[lo, hi] for lo, hi in zip(bbox_lbs, bbox_ubs)]
        image = torch.from_numpy(crop_and_pad_nd(data, bbox, 0)).float()
        segmentation = torch.from_numpy(crop_and_pad_nd(seg, bbox, -1, cast_cropped_to=np.int16)).to(torch.int16)
        transforms = self.transforms
        if not full and self.light_transforms is not None:
            image, segmentation = centre_crop(image, self.final_patch_size), \
                centre_crop(segmentation, self.final_patch_size)
            transforms = self.light_transforms
        if transforms is None:
            return image, segmentation
        out = transforms(**{'image': image, 'segmentation': segmentation})
        return out['image'], out['segmentation']

    def generate_train_batch(self):
        keys = self.get_indices()
        focus = self.draw_focus_slots()
        data_all = seg_all = None
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            for g in range(self.groups_per_batch):
                first = g * self.group_size
                data, seg, seg_prev, properties = self._data.load_case(keys[first])
                if seg_prev is not None:
                    raise NotImplementedError("GroupDataLoader does not support cascaded data")
                for j in range(first, first + self.group_size):
                    image, segmentation = self._sample(data, seg, properties, j, bool(focus[j]))
                    if data_all is None:
                        data_all = torch.empty((self.batch_size, *image.shape), dtype=torch.float32)
                    data_all[j] = image
                    segs = segmentation if isinstance(segmentation, list) else [segmentation]
                    if seg_all is None:
                        seg_all = [torch.empty((self.batch_size, *s.shape), dtype=s.dtype) for s in segs]
                    for s_all, s in zip(seg_all, segs):
                        s_all[j] = s
        target = seg_all if isinstance(segmentation, list) else seg_all[0]
        return {'data': data_all, 'target': target, 'keys': keys,
                'group_ids': torch.arange(self.batch_size) // self.group_size, 'focus_slots': focus}
