"""The Focus predicts only the group tiles whose reward can depend on it, and the rewards stay those of predicting all."""
from types import SimpleNamespace

import torch
from torch import nn

from nnunetv2_gfscreen.core.grl import detection_reward, dice_reward
from nnunetv2_gfscreen.trainers import GFScreenTrainer, GFScreenTrainer_DiceReward
from nnunetv2_gfscreen.trainers.group_sampling import holds_lesion

IGNORE = 2


class CountingFocus(nn.Module):
    """A deterministic Focus: foreground where the image is > 0; counts the tiles it predicts."""

    def __init__(self):
        super().__init__()
        self.tiles = []

    def forward(self, x):
        self.tiles.append(x.detach().clone())
        return torch.cat([torch.zeros_like(x), x], dim=1)


def _trainer(cls, focus):
    t = cls.__new__(cls)          # the hooks need no nnU-Net state beyond these
    t.device, t.batch_size = torch.device("cpu"), 2
    t.label_manager = SimpleNamespace(ignore_label=IGNORE)
    t.local_network = lambda: focus
    return t


def _toy_batch():
    """Two groups of 4 tiles (2x4x4 voxels): which tiles hold valid lesion, and one repeated crop."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(8, 1, 2, 4, 4, generator=g)
    target = torch.zeros(8, 1, 2, 4, 4, dtype=torch.int16)
    data[0, 0, 0, 0, 0], target[0, 0, 0, 0, 0] = 1.0, 1      # lesion that the Focus finds: reward 1
    data[1, 0, 1, 2, 2], target[1, 0, 1, 2, 2] = -1.0, 1     # lesion that the Focus misses: reward 0
    data[2] = data[2].abs()                                  # no lesion, yet the Focus predicts foreground
    target[3, 0, 1] = IGNORE                                 # only the ignore label: no valid lesion
    data[4, 0, :, :2], data[4, 0, :, 2:] = 2.0, -2.0
    target[4, 0, :, :2] = 1                                  # a large lesion, half found (Dice < 1)
    target[4, 0, :, 2:] = 1
    data[5], target[5] = data[4], target[4]                  # the same crop again (a repeated lesion tile)
    target[6, 0, 0, 0] = 1                                   # lesion in the second group, partly ignored,
    target[6, 0, 0, 0, 0] = IGNORE
    data[6] = -data[6].abs()
    data[6, 0, 0, 0, 1] = 1.0                                # found at one valid voxel
    batch = {"group_data": data, "group_target": target, "group_ids": torch.arange(8) // 4,
             "group_source": torch.tensor([0, 1, 2, 3, 4, 4, 6, 7]),
             "group_lesion_anywhere": holds_lesion(target, IGNORE)}
    return batch


def _masks(target):
    valid = target != IGNORE
    return (target > 0) & valid, valid


def test_focus_runs_only_on_distinct_lesion_tiles_and_rewards_are_unchanged():
    batch = _toy_batch()
    gt, valid = _masks(batch["group_target"])
    full = batch["group_data"] > 0               # the Focus's prediction of every tile
    for cls, reward in ((GFScreenTrainer, detection_reward), (GFScreenTrainer_DiceReward, dice_reward)):
        focus = CountingFocus()
        t = _trainer(cls, focus)
        assert t.focus_tiles(batch).tolist() == [0, 1, 4, 6]
        pred = t.group_focus_predictions(batch, batch["group_data"])
        seen = torch.cat(focus.tiles)
        assert seen.shape[0] == 4                               # 4 passes instead of 8, in chunks of 2
        assert torch.equal(seen, batch["group_data"][[0, 1, 4, 6]])
        assert torch.equal(pred[[0, 1, 4, 5, 6]], full[[0, 1, 4, 5, 6]])   # tile 5 takes tile 4's prediction
        assert not pred[[2, 3, 7]].any()                        # no pass: left empty
        rewards = t.compute_rewards(pred, gt, valid)
        assert torch.equal(rewards, reward(full, gt, valid))
    assert dice_reward(full, gt, valid)[4] == 2 * 16 / (16 + 32)  # the toy batch does exercise a Dice below 1
    assert detection_reward(full, gt, valid).tolist() == [1, 0, 0, 0, 1, 1, 1, 0]


def test_focus_tiles_without_the_loader_keys_test_the_targets():
    batch = _toy_batch()
    del batch["group_lesion_anywhere"], batch["group_source"]
    t = _trainer(GFScreenTrainer, CountingFocus())
    assert t.focus_tiles(batch).tolist() == [0, 1, 4, 5, 6]    # the repeated crop is predicted again
    assert holds_lesion(batch["group_target"], None).tolist() == [True, True, False, True, True, True, True, False]


def test_no_lesion_in_the_batch_means_no_focus_pass():
    batch = _toy_batch()
    batch["group_target"].zero_()
    batch["group_lesion_anywhere"] = holds_lesion(batch["group_target"], IGNORE)
    focus = CountingFocus()
    t = _trainer(GFScreenTrainer, focus)
    pred = t.group_focus_predictions(batch, batch["group_data"])
    assert focus.tiles == [] and pred.shape == (8, 1, 2, 4, 4) and not pred.any()
