"""Variants of GFScreenTrainer: the paper's Glance ablation (each overrides one hook), and short schedules.

As nnU-Net's own variants do, each is a small subclass that `-tr NAME` finds. `ShortSchedule` is the one mixin
for shortened runs (tests, the CPU demo and method benchmark, `nnUNetv2_gfscreen_ablation --quick`).
"""
import torch
from torch import nn

from nnunetv2_gfscreen.core.grl import balanced_bce, dice_reward
from nnunetv2_gfscreen.trainers.GFScreenTrainer import GFScreenTrainer


# ---------------------------------------------------------------------- the paper's ablation (full length)
class GFScreenTrainer_DiceReward(GFScreenTrainer):
    """Ablation: per-sub-volume Dice reward instead of the binary detection reward."""

    def compute_rewards(self, pred_fg, gt_fg, valid):
        return dice_reward(pred_fg, gt_fg, valid)


class GFScreenTrainer_NoAlphaCE(GFScreenTrainer):
    """Ablation: GRL with the binary reward but without the class-balanced CE term."""

    def grl_alpha(self) -> float:
        return 0.0


class GFScreenTrainer_PlainCE(GFScreenTrainer):
    """Ablation baseline: the Glance trained by plain binary CE on lesion presence (no GRL)."""

    def glance_objective(self, glance_logits, ref_logits, rewards, lesion, group_ids):
        ce = nn.functional.binary_cross_entropy_with_logits(glance_logits, lesion)
        zero = glance_logits.new_zeros(())
        return {"grl_clip": zero, "grl_kl": zero, "grl_ce": ce, "grl_losses": ce}


class GFScreenTrainer_BalancedCE(GFScreenTrainer):
    """Ablation baseline: the Glance trained by class-balanced CE only (no GRL)."""

    def glance_objective(self, glance_logits, ref_logits, rewards, lesion, group_ids):
        ce = balanced_bce(glance_logits, lesion, check_values=False)
        zero = glance_logits.new_zeros(())
        return {"grl_clip": zero, "grl_kl": zero, "grl_ce": ce, "grl_losses": ce}


class GFScreenTrainer_Group4(GFScreenTrainer):
    """Ablation: groups of 4 sub-volumes instead of 16."""
    settings_overrides = {"group_size": 4}


# ---------------------------------------------------------------------- short schedules
class ShortSchedule:
    """Mixin (put it first in the bases): `short_epochs` x `short_iterations`, a checkpoint every `save_every`
    epochs, no mirroring (neither in training nor at inference: a CPU cannot afford 8x TTA)."""
    short_epochs = 10
    short_iterations = 10
    short_val_iterations = 2
    short_save_every = 1

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.short_epochs
        self.num_iterations_per_epoch = self.short_iterations
        self.num_val_iterations_per_epoch = self.short_val_iterations
        self.save_every = self.short_save_every

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, None


class GFScreenTrainer_Tiny(ShortSchedule, GFScreenTrainer):
    """2 epochs x 2 iterations, groups of 4: the end-to-end tests."""
    short_epochs, short_iterations, short_val_iterations = 2, 2, 1
    settings_overrides = {"group_size": 4}


class GFScreenTrainer_Demo(ShortSchedule, GFScreenTrainer):
    """A CPU-sized run: 20 epochs x 20 iterations, groups of 8."""
    short_epochs, short_iterations, short_val_iterations, short_save_every = 20, 20, 4, 5
    settings_overrides = {"group_size": 8}


class GFScreenTrainer_DemoLong(GFScreenTrainer_Demo):
    """The Demo schedule four times longer (80 epochs x 20 iterations): benchmarks/learning_check.py, the
    shipped demo model."""
    short_epochs = 80


# `nnUNetv2_gfscreen_ablation --quick`: every arm on the same short schedule (ShortSchedule's defaults), so the
# arms differ only in the hook their full-length variant overrides.
class GFScreenTrainer_Short(ShortSchedule, GFScreenTrainer):
    """The full method (GRL + binary reward + alpha CE), short schedule."""


class GFScreenTrainer_PlainCE_Short(ShortSchedule, GFScreenTrainer_PlainCE):
    """Plain CE Glance, short schedule."""


class GFScreenTrainer_BalancedCE_Short(ShortSchedule, GFScreenTrainer_BalancedCE):
    """Class-balanced CE Glance, short schedule."""


class GFScreenTrainer_DiceReward_Short(ShortSchedule, GFScreenTrainer_DiceReward):
    """GRL with the Dice reward, short schedule."""


class GFScreenTrainer_NoAlphaCE_Short(ShortSchedule, GFScreenTrainer_NoAlphaCE):
    """GRL with the binary reward and no alpha CE, short schedule."""


class GFScreenTrainer_Group4_Short(ShortSchedule, GFScreenTrainer_Group4):
    """The full method with groups of 4, short schedule."""
