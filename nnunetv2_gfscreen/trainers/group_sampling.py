"""Training batches for GF-Screen: nnU-Net's own Focus batch, plus groups of tiles per CT for GRL.

The group is GRPO's candidate set (docs/method.md, section 3.1): advantages are relative within one CT, so a group
is `group_size` tiles of one CT. The Focus only needs a prediction on them (for the rewards),
not a gradient, so the Focus's gradient batch is drawn separately and exactly as nnU-Net draws it
(its `nnUNetDataLoader.generate_train_batch`: batch_size patches from different CTs, its
foreground oversampling, its full augmentation). Taking the Focus's batch out of one group instead
(our first version) gave the Focus one CT per step and fewer lesion patches than nnU-Net, and
augmenting all 16 group slots cost 8x nnU-Net's data-loading CPU time per step (docs/results.md).

Group tiles are cut the way the predictor cuts a case: nnU-Net's sliding-window grid (its
`compute_steps_for_sliding_window`, patch size and step) over the preprocessed case, shifted as a
whole by a random offset of up to half a step per axis, so that lesions sit anywhere in a tile and
often only as slivers at its edge, as at inference. (Our earlier groups centred forced slots on a
lesion voxel, which the Glance never sees at inference.) `lesion_share` of the slots are drawn from
the grid tiles whose *central region* holds lesion (see `central_region`), the rest from all other
grid tiles, slivers included. A lesion slot draws a lesion first, uniformly among the case's lesions,
then a tile whose central region holds it (`draw_per_lesion`, case_lesions.py), so that every lesion,
however small, is drawn as often; `per_lesion=False` draws uniformly among the lesion tiles found from
nnU-Net's `class_locations` instead (the earlier sampler, kept for comparison). Each tile's Glance label (`group_lesion`) is the same central-region
test; the reward stays the paper's (the Focus's prediction overlaps the lesion anywhere in the tile).

The loader also says, per slot, what the trainer needs to skip Focus passes that cannot change a reward:
whether the tile holds a lesion voxel anywhere (`group_lesion_anywhere`; a tile without one gets reward 0
whatever the Focus predicts) and which earlier slot holds the very same crop (`group_source`: a case with
fewer lesion tiles than lesion slots repeats tiles, and an identical input needs one prediction).
"""
import itertools
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from nnunetv2_gfscreen.core.coverage import CENTRAL_MARGIN, central_boxes
from nnunetv2_gfscreen.trainers.case_lesions import LesionCache, lesion_id_crop, lesion_tiles
from nnunetv2_gfscreen.trainers.glance_training import lesion_map_weights


def centre_crop(x: torch.Tensor, size) -> torch.Tensor:
    """Central `size` crop of the trailing spatial axes of x (C, *spatial); size <= x's spatial shape."""
    spatial = x.shape[1:]
    if len(size) != len(spatial) or any(s < p for s, p in zip(spatial, size)):
        raise ValueError(f"cannot crop {tuple(size)} from a patch of {tuple(spatial)}")
    return x[(slice(None),) + tuple(slice((s - p) // 2, (s - p) // 2 + p) for s, p in zip(spatial, size))]


def shifted_grid(shape: Sequence[int], patch_size: Sequence[int], tile_step_size: float,
                 rng: np.random.RandomState) -> List[Tuple[int, ...]]:
    """Tile starts (z, y, x) of the predictor's sliding-window grid over a case of `shape`, shifted as a whole.

    The grid is nnU-Net's (`compute_steps_for_sliding_window` on the shape padded to at least the patch, as
    the predictor pads); every start moves by one random offset per axis, uniform in [-step/2, step/2]
    (step = patch * tile_step_size), so lesions fall anywhere in a tile. Starts may lie outside the case:
    the crop pads there, as the predictor's padding does.
    """
    padded = [max(s, p) for s, p in zip(shape, patch_size)]
    steps = compute_steps_for_sliding_window(tuple(padded), tuple(patch_size), tile_step_size)
    half = [int(p * tile_step_size) // 2 for p in patch_size]
    offset = [rng.randint(-h, h + 1) if h > 0 else 0 for h in half]
    return [tuple(int(s + o) for s, o in zip(start, offset)) for start in itertools.product(*steps)]


def central_region(start: Sequence[int], patch_size: Sequence[int], shape: Sequence[int]) -> List[Tuple[int, int]]:
    """The central region of a tile in case coordinates, [lo, hi) per axis.

    The middle half of each axis (a quarter patch trimmed on each side), except that a side at or beyond
    the case's border is not trimmed (no other tile reaches past it). At tile step 0.5 these regions
    cover the case, each voxel about once, so "lesion in my central region" marks one tile per lesion
    part: the one that holds it with margin.
    """
    box = np.array([[[s, s + p] for s, p in zip(start, patch_size)]])
    return [(int(lo), int(hi)) for lo, hi in central_boxes(box, shape, CENTRAL_MARGIN)[0]]


def holds_lesion(segmentation: torch.Tensor, ignore_label: Optional[int]) -> torch.Tensor:
    """(B,) bool per tile of `segmentation` (B, ...): a voxel labelled lesion (> 0) that is not the ignore label.

    The one test of "this tile's valid ground truth holds lesion" shared by the loader and the trainer: the
    binary and the Dice reward are 0 on any other tile (core/grl.py), whatever the Focus predicts there."""
    lesion = segmentation > 0
    if ignore_label is not None:
        lesion &= segmentation != ignore_label
    return lesion.flatten(1).any(1)


def lesion_locations(properties: dict) -> np.ndarray:
    """(L, 3) voxel coordinates (z, y, x) of nnU-Net's sampled foreground locations (all labels > 0)."""
    locs = [np.asarray(v)[:, -3:] for k, v in properties['class_locations'].items()
            if len(v) and not (isinstance(k, (int, np.integer)) and k <= 0)]
    return np.concatenate(locs).astype(np.int64) if locs else np.zeros((0, 3), np.int64)


def tiles_with_lesion(starts: Sequence[Sequence[int]], patch_size: Sequence[int], shape: Sequence[int],
                      locations: np.ndarray) -> np.ndarray:
    """(T,) bool: whether the central region of each tile holds one of `locations` ((L, 3) z, y, x)."""
    if len(locations) == 0 or len(starts) == 0:
        return np.zeros(len(starts), dtype=bool)
    regions = central_boxes(np.array([[[s, s + p] for s, p in zip(start, patch_size)] for start in starts]),
                            shape, CENTRAL_MARGIN)                                   # (T, 3, 2)
    inside = (locations[:, None, :] >= regions[None, :, :, 0]) & (locations[:, None, :] < regions[None, :, :, 1])
    return inside.all(2).any(0)


def draw_per_lesion(tiles_per_lesion: Sequence[np.ndarray], n: int, rng) -> List[int]:
    """n tile indices: each draws a lesion uniformly among those with a tile, then one of its tiles uniformly,
    preferring tiles not drawn yet (a lesion spanning several tiles shows them in turn)."""
    lesions = [np.asarray(t) for t in tiles_per_lesion if len(t)]
    if not lesions:
        raise ValueError("no lesion has a tile to draw")
    taken, out = set(), []
    for _ in range(n):
        tiles = lesions[rng.randint(len(lesions))]
        fresh = [int(t) for t in tiles if int(t) not in taken]
        t = int(rng.choice(fresh if fresh else tiles))
        taken.add(t)
        out.append(t)
    return out


class GroupDataLoader(nnUNetDataLoader):
    """nnU-Net's loader (its batch unchanged, for the Focus) that also draws GRL groups of grid tiles.

    Each batch dict holds nnU-Net's `data`, `target`, `keys`, plus:
      - `group_data` (G*N, C, *final_patch_size) float32: `groups_per_batch` CTs x `group_size` tiles of the
        case's shifted sliding-window grid (`shifted_grid`), group-major; within a group the last
        round(N * lesion_share) slots are drawn from the tiles whose central region holds lesion (a lesion
        first, with `per_lesion`; tiles repeat if there are fewer; healthy CTs have none), the others from
        the remaining tiles;
      - `group_target` (G*N, 1, *final_patch_size) int16, full resolution only (rewards, dense targets);
      - `group_lesion` (G*N,) float32: 1 if the tile's central region holds lesion (the Glance's label);
      - `group_lesion_anywhere` (G*N,) bool: the tile's target holds a lesion voxel anywhere (`holds_lesion`);
      - `group_source` (G*N,) long: the first slot of the batch holding the same crop (same CT and start, and
        equal image and target after the group transforms, i.e. the same mirroring), the slot itself if none;
      - `group_ids` (G*N,) long; `group_keys`, the CT of each group; `group_starts`, each tile's start (z, y, x);
      - with `dense_shape` (the Glance's dense map shape), `group_dense_weight` (G*N, 1, *dense_shape) float32:
        the per-lesion weights of the dense map's lesion voxels (glance_training.lesion_map_weights).
    """

    def __init__(self, data, batch_size: int, patch_size, final_patch_size, label_manager,
                 oversample_foreground_percent: float, group_size: int, groups_per_batch: int, lesion_share: float,
                 transforms=None, group_transforms=None, probabilistic_oversampling: bool = False,
                 tile_step_size: float = 0.5, per_lesion: bool = True,
                 dense_shape: Optional[Sequence[int]] = None):
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2 for a group-relative advantage, got {group_size}")
        if groups_per_batch < 1:
            raise ValueError(f"groups_per_batch must be >= 1, got {groups_per_batch}")
        if not 0.0 <= lesion_share <= 1.0:
            raise ValueError(f"lesion_share must be in [0, 1], got {lesion_share}")
        if not 0.0 < tile_step_size <= 1.0:
            raise ValueError(f"tile_step_size must be in (0, 1], got {tile_step_size}")
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=oversample_foreground_percent, sampling_probabilities=None,
                         pad_sides=None, probabilistic_oversampling=probabilistic_oversampling, transforms=transforms)
        if self.patch_size_was_2d:
            raise NotImplementedError("GroupDataLoader supports 3D patches only")
        self.group_size = group_size
        self.groups_per_batch = groups_per_batch
        self.lesion_share = lesion_share
        self.tile_step_size = tile_step_size
        self.group_transforms = group_transforms
        self.ignore_label = label_manager.ignore_label
        self.per_lesion = per_lesion
        self.dense_shape = tuple(int(s) for s in dense_shape) if dense_shape is not None else None
        self.lesions = LesionCache(self.ignore_label)

    @property
    def n_lesion_slots(self) -> int:
        """Slots per group drawn from lesion tiles (the last ones): round(N * lesion_share)."""
        return round(self.group_size * self.lesion_share)

    def choose_tiles(self, lesion: np.ndarray, tiles_per_lesion: Optional[Sequence[np.ndarray]] = None) -> List[int]:
        """Grid tile indices for the group's slots (lesion: (T,) bool per grid tile): others first, then the
        lesion slots, per lesion (`draw_per_lesion`) when `tiles_per_lesion` is given, else uniformly among the
        lesion tiles. Without replacement where the grid has enough tiles of the kind."""
        n_lesion_slots = self.n_lesion_slots if lesion.any() else 0
        pos, neg = np.flatnonzero(lesion), np.flatnonzero(~lesion)
        if len(neg) == 0:      # every tile holds lesion: the "other" slots take lesion tiles too
            neg = pos
        n_other = self.group_size - n_lesion_slots
        chosen = [np.random.choice(neg, n_other, replace=len(neg) < n_other)]
        if n_lesion_slots and tiles_per_lesion is not None:
            chosen.append(np.asarray(draw_per_lesion(tiles_per_lesion, n_lesion_slots, np.random), dtype=np.int64))
        elif n_lesion_slots:
            chosen.append(np.random.choice(pos, n_lesion_slots, replace=len(pos) < n_lesion_slots))
        return [int(i) for i in np.concatenate(chosen)]

    def _crop(self, data, seg, start) -> Tuple[torch.Tensor, torch.Tensor]:
        bbox = [[s, s + p] for s, p in zip(start, self.final_patch_size)]
        image = torch.from_numpy(crop_and_pad_nd(data, bbox, 0)).float()
        segmentation = torch.from_numpy(crop_and_pad_nd(seg, bbox, -1, cast_cropped_to=np.int16)).to(torch.int16)
        return image, segmentation

    def _central_label(self, segmentation: torch.Tensor, start, shape) -> bool:
        region = central_region(start, self.final_patch_size, shape)
        local = tuple(slice(lo - s, hi - s) for (lo, hi), s in zip(region, start))
        return bool((segmentation[(slice(None),) + local] > 0).any())

    def generate_groups(self, cases: Optional[np.ndarray] = None) -> dict:
        """The groups of one batch (see the class docstring); `cases` fixes their CTs (else drawn at random)."""
        if cases is None:
            cases = np.random.choice(self.indices, self.groups_per_batch, replace=True)
        n = self.group_size * len(cases)
        group_data = group_target = None
        group_lesion = torch.zeros(n, dtype=torch.float32)
        group_source = torch.arange(n)
        group_starts = []
        dense_weight = torch.zeros((n, 1, *self.dense_shape)) if self.dense_shape is not None else None
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            for g, key in enumerate(cases):
                data, seg, seg_prev, properties = self._data.load_case(key)   # once per group
                unique_at = {}                                                   # start -> slots of distinct crops
                if seg_prev is not None:
                    raise NotImplementedError("GroupDataLoader does not support cascaded data")
                shape = data.shape[1:]
                starts = shifted_grid(shape, self.final_patch_size, self.tile_step_size, np.random)
                per_lesion = None
                lesions = self.lesions.get(key, seg) if self.per_lesion or dense_weight is not None else None
                if self.per_lesion:
                    per_lesion = lesion_tiles(starts, self.final_patch_size, shape, lesions)
                    lesion = np.zeros(len(starts), dtype=bool)
                    for tiles in per_lesion:
                        lesion[tiles] = True
                else:
                    lesion = tiles_with_lesion(starts, self.final_patch_size, shape, lesion_locations(properties))
                for slot, t in enumerate(self.choose_tiles(lesion, per_lesion)):
                    image, segmentation = self._crop(data, seg, starts[t])
                    group_starts.append(starts[t])
                    i = g * self.group_size + slot
                    # labelled before mirroring: a border side of the central region is not symmetric
                    group_lesion[i] = float(self._central_label(segmentation, starts[t], shape))
                    present = []
                    if dense_weight is not None:   # lesion ids ride along as a second channel: mirrored alike
                        ids, present = lesion_id_crop(lesions, starts[t], self.final_patch_size)
                        segmentation = torch.cat([segmentation, torch.from_numpy(ids)])
                    if self.group_transforms is not None:
                        out = self.group_transforms(**{'image': image, 'segmentation': segmentation})
                        image, segmentation = out['image'], out['segmentation']
                    if isinstance(segmentation, (list, tuple)):
                        raise ValueError("group_transforms must return the full-resolution segmentation only "
                                         "(no deep-supervision list)")
                    if dense_weight is not None:
                        segmentation, ids = segmentation[:1], segmentation[1:]
                    if group_data is None:
                        group_data = torch.empty((n, *image.shape), dtype=torch.float32)
                        group_target = torch.empty((n, *segmentation.shape), dtype=segmentation.dtype)
                    group_data[i] = image
                    group_target[i] = segmentation
                    same = [j for j in unique_at.get(starts[t], [])
                            if torch.equal(group_data[j], image) and torch.equal(group_target[j], segmentation)]
                    if same:
                        group_source[i] = same[0]
                    else:
                        unique_at.setdefault(starts[t], []).append(i)
                    if dense_weight is not None and present:
                        dense_weight[i] = dense_weight[same[0]] if same else \
                            lesion_map_weights(ids[None], self.dense_shape, [present])[0]
        return {'group_data': group_data, 'group_target': group_target, 'group_lesion': group_lesion,
                'group_lesion_anywhere': holds_lesion(group_target, self.ignore_label), 'group_source': group_source,
                'group_keys': list(cases), 'group_ids': torch.arange(n) // self.group_size,
                'group_starts': group_starts,
                **({'group_dense_weight': dense_weight} if dense_weight is not None else {})}

    def generate_train_batch(self):
        batch = super().generate_train_batch()   # nnU-Net's Focus batch, unchanged
        batch.update(self.generate_groups())
        return batch


def group_transforms(mirror_axes) -> ComposeTransforms:
    """Transforms of the GRL group's sub-volumes: mirroring (if the trainer mirrors) and nnU-Net's clean-up of
    the padding label; no intensity or spatial augmentation, so they look like the tiles seen at inference."""
    mirror = [MirrorTransform(allowed_axes=mirror_axes)] if mirror_axes else []
    return ComposeTransforms(mirror + [RemoveLabelTansform(-1, 0)])
