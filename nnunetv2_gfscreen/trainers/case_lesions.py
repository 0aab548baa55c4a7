"""A training case's lesions, for the group sampler: found once per case and loader process, then reused.

A lesion is the project's one definition (core/lesions.py: a 26-connected component of the case's ground truth,
here of its voxels labelled > 0 and not the ignore label). The sampler draws a lesion slot per lesion (a lesion
first, then a tile holding it), so that a small lesion next to a large one is drawn as often as the large one;
nnU-Net's `class_locations` are a uniform sample of lesion *voxels*, in which a small lesion barely appears.
Each lesion keeps its bounding box and its mask inside it, bit-packed (cases are loaded many times, by many
loader processes; the full label map of a CT would cost far more memory).
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy.ndimage import find_objects

from nnunetv2_gfscreen.core.coverage import CENTRAL_MARGIN, central_boxes
from nnunetv2_gfscreen.core.lesions import label_lesions


@dataclass(frozen=True)
class Lesion:
    """One lesion of a case: its bounding box [lo, lo + shape) in case voxels and its mask there (packed)."""
    lo: Tuple[int, int, int]
    shape: Tuple[int, int, int]
    bits: np.ndarray
    voxels: int

    def mask(self) -> np.ndarray:
        """(shape) bool: the lesion's voxels inside its bounding box."""
        return np.unpackbits(self.bits, count=int(np.prod(self.shape))).astype(bool).reshape(self.shape)

    @property
    def hi(self) -> Tuple[int, int, int]:
        return tuple(a + s for a, s in zip(self.lo, self.shape))


def find_lesions(seg: np.ndarray, ignore_label: Optional[int]) -> List[Lesion]:
    """The lesions of a case's segmentation (1, z, y, x) or (z, y, x): voxels > 0 that are not the ignore label."""
    seg = np.asarray(seg)
    if seg.ndim == 4:
        seg = seg[0]
    mask = seg > 0
    if ignore_label is not None:
        mask &= seg != ignore_label
    labels, n = label_lesions(mask)
    lesions = []
    for i, box in enumerate(find_objects(labels, max_label=n)):
        inside = labels[box] == i + 1
        lesions.append(Lesion(lo=tuple(int(s.start) for s in box), shape=inside.shape,
                              bits=np.packbits(inside, axis=None), voxels=int(inside.sum())))
    return lesions


def lesion_tiles(starts: Sequence[Sequence[int]], patch_size: Sequence[int], shape: Sequence[int],
                 lesions: Sequence[Lesion]) -> List[np.ndarray]:
    """For each lesion, the indices of the tiles (starts: (T, 3)) whose central region holds one of its voxels."""
    if not len(starts):
        return [np.zeros(0, dtype=np.int64) for _ in lesions]
    regions = central_boxes(np.array([[[s, s + p] for s, p in zip(start, patch_size)] for start in starts]),
                            shape, CENTRAL_MARGIN)                                   # (T, 3, 2)
    out = []
    for lesion in lesions:
        lo = np.maximum(regions[:, :, 0], lesion.lo)
        hi = np.minimum(regions[:, :, 1], lesion.hi)
        candidates = np.flatnonzero(np.all(hi > lo, axis=1))
        mask = lesion.mask() if len(candidates) else None
        hits = [t for t in candidates
                if mask[tuple(slice(a - o, b - o) for a, b, o in zip(lo[t], hi[t], lesion.lo))].any()]
        out.append(np.asarray(hits, dtype=np.int64))
    return out


def lesion_id_crop(lesions: Sequence[Lesion], start: Sequence[int],
                   patch_size: Sequence[int]) -> Tuple[np.ndarray, List[int]]:
    """(1, *patch) int16: lesion i + 1 where the tile at `start` holds a voxel of lesion i, 0 elsewhere; and the
    ids it holds."""
    if len(lesions) >= np.iinfo(np.int16).max:
        raise ValueError(f"{len(lesions)} lesions in one case: more than an int16 lesion map holds")
    out, present = np.zeros((1, *patch_size), dtype=np.int16), []
    tile_lo = np.asarray(start)
    tile_hi = tile_lo + np.asarray(patch_size)
    for i, lesion in enumerate(lesions):
        lo, hi = np.maximum(tile_lo, lesion.lo), np.minimum(tile_hi, lesion.hi)
        if np.any(hi <= lo):
            continue
        part = lesion.mask()[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, lesion.lo))]
        if part.any():
            view = out[(0,) + tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, tile_lo))]
            view[part] = i + 1
            present.append(i + 1)
    return out, present


class LesionCache:
    """Lesions per case key, found on first use (each loader process holds its own cache)."""

    def __init__(self, ignore_label: Optional[int]):
        self.ignore_label = ignore_label
        self._lesions: Dict[str, List[Lesion]] = {}

    def get(self, key: str, seg: np.ndarray) -> List[Lesion]:
        if key not in self._lesions:
            self._lesions[key] = find_lesions(seg, self.ignore_label)
        return self._lesions[key]
