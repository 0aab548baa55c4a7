"""Variants of GFScreenTrainer: the paper's Glance ablation, each overriding one hook.

As nnU-Net's own variants do, each is a small subclass that `-tr NAME` finds. Short CPU schedules of these
arms (tests, demo, `--quick` ablation) live in the repository's lab (gfscreen_lab/trainers.py), not here.
"""
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
