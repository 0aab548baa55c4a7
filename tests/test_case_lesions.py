"""Lesion slots per lesion: a case's lesions (found once per case), the tiles holding each, and the draw."""
import numpy as np
import pytest

from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from nnunetv2_gfscreen.core.lesions import label_lesions
from nnunetv2_gfscreen.trainers import case_lesions
from nnunetv2_gfscreen.trainers.case_lesions import LesionCache, find_lesions, lesion_id_crop, lesion_tiles
from nnunetv2_gfscreen.trainers.group_sampling import central_region, draw_per_lesion, shifted_grid

SHAPE, PATCH = (32, 96, 96), (16, 48, 48)


class _Offset:
    """shifted_grid's random source, fixed to one offset."""

    def __init__(self, v):
        self.v = v

    def randint(self, lo, hi):
        return self.v


def _large_and_small():
    seg = np.zeros((1,) + SHAPE, dtype=np.int16)
    seg[0, 2:20, 4:60, 4:60] = 1          # 56,448 voxels over several tiles
    seg[0, 26:28, 84:86, 84:86] = 1       # 8 voxels in the far corner
    return seg


def test_a_small_lesion_next_to_a_large_one_gets_half_of_the_lesion_slots():
    seg = _large_and_small()
    lesions = find_lesions(seg, None)
    assert sorted(l.voxels for l in lesions) == [8, 56448]
    starts = shifted_grid(SHAPE, PATCH, 0.5, _Offset(0))
    per_lesion = lesion_tiles(starts, PATCH, SHAPE, lesions)
    small = per_lesion[[l.voxels for l in lesions].index(8)]
    large = per_lesion[[l.voxels for l in lesions].index(56448)]
    assert len(small) == 1 and len(large) > 4 and not set(small) & set(large)
    rng = np.random.RandomState(0)
    draws = np.concatenate([draw_per_lesion(per_lesion, 5, rng) for _ in range(1000)])
    share = np.isin(draws, small).mean()
    assert 0.45 < share < 0.55                                          # 5000 draws of p = 0.5
    tile_uniform = len(small) / (len(small) + len(large))               # the earlier sampler: any lesion tile
    voxel_uniform = 8 / (8 + 56448)                                     # nnU-Net's class_locations
    assert share > 3 * tile_uniform and share > 1000 * voxel_uniform
    # a lesion's tiles come in turn: 5 slots on the large lesion's tiles repeat none while some are left
    only_large = draw_per_lesion([large], 5, rng)
    assert len(set(only_large)) == 5 and set(only_large) <= set(large)
    with pytest.raises(ValueError, match="no lesion"):
        draw_per_lesion([np.zeros(0, int)], 1, rng)


def test_lesion_tiles_and_id_crops_match_the_labelled_volume():
    rng = np.random.RandomState(1)
    seg = (rng.rand(1, *SHAPE) > 0.997).astype(np.int16)    # scattered single voxels and small clusters
    seg[0, 10:14, 30:50, 30:50] = 1
    seg[0, 5, 5, 5] = 2                                      # the ignore label: not a lesion
    labels, n = label_lesions((seg[0] > 0) & (seg[0] != 2))
    lesions = find_lesions(seg, ignore_label=2)
    assert len(lesions) == n and sum(l.voxels for l in lesions) == int(((seg > 0) & (seg != 2)).sum())
    starts = shifted_grid(SHAPE, PATCH, 0.5, _Offset(-5))
    per_lesion = lesion_tiles(starts, PATCH, SHAPE, lesions)
    for t, start in enumerate(starts):
        region = central_region(start, PATCH, SHAPE)
        box = tuple(slice(max(lo, 0), hi) for lo, hi in region)
        # find_lesions numbers lesions as label_lesions does (scan order), so ids match the labelled volume
        present = set(np.unique(labels[box]).tolist()) - {0}
        assert present == {i + 1 for i, tiles in enumerate(per_lesion) if t in tiles}
        crop = crop_and_pad_nd(labels[None].astype(np.int16), [[s, s + p] for s, p in zip(start, PATCH)], 0)
        ids, present = lesion_id_crop(lesions, start, PATCH)
        assert np.array_equal(ids, crop) and sorted(present) == sorted(set(np.unique(crop).tolist()) - {0})


def test_the_cache_finds_a_cases_lesions_once(monkeypatch):
    calls = []
    real = case_lesions.find_lesions
    monkeypatch.setattr(case_lesions, "find_lesions", lambda seg, ignore: calls.append(1) or real(seg, ignore))
    cache = LesionCache(ignore_label=None)
    seg = _large_and_small()
    for _ in range(3):
        assert len(cache.get("a", seg)) == 2
    cache.get("b", seg[:, :10])
    assert len(calls) == 2
