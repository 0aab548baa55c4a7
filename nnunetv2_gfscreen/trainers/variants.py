"""Variants of GFScreenTrainer: the Glance ablation, each arm overriding one hook of the Glance's objective.

Each arm states what it changes against the default (GRL with the binary reward and the alpha-weighted balanced CE
term, plus the dense lesion-map loss from which the select logit starts); everything else (data, Focus, schedule,
EMA, calibration) is identical. As nnU-Net's own variants, each is a small subclass that `-tr NAME` finds. Short CPU
schedules of these arms (tests, demo, the method benchmark's ablation) live in the lab (gfscreen_lab/trainers.py).
"""
from nnunetv2_gfscreen.core.grl import balanced_bce, dice_reward
from nnunetv2_gfscreen.trainers.GFScreenTrainer import GFScreenTrainer


def _tile_terms(logits, ce=None, weight: float = 1.0) -> dict:
    """The tile-level terms without GRL: the CE term (unweighted, as GRL reports it) and its weighted total."""
    zero = logits.new_zeros(())
    ce = zero if ce is None else ce
    return {"grl_clip": zero, "grl_kl": zero, "grl_ce": ce, "grl_losses": weight * ce}


class GFScreenTrainer_DenseOnly(GFScreenTrainer):
    """Ablation, the dense map alone: no GRL and no CE term (the tile-level objective is 0); the select logit learns
    only through the dense map it starts from."""

    def glance_objective(self, glance_logits, ref_logits, rewards, lesion, group_ids):
        return _tile_terms(glance_logits)


class GFScreenTrainer_DenseBalancedCE(GFScreenTrainer):
    """Ablation, the dense map and balanced CE without GRL: the tile-level objective is the default's CE term alone
    (alpha x class-balanced CE); the clipped-ratio and KL terms are gone."""

    def glance_objective(self, glance_logits, ref_logits, rewards, lesion, group_ids):
        ce = balanced_bce(glance_logits, lesion, check_values=False,
                          label_smoothing=self.gfscreen.glance_label_smoothing)  # the default's CE term, as it is
        return _tile_terms(glance_logits, ce, self.grl_alpha())


class GFScreenTrainer_NoDenseMap(GFScreenTrainer):
    """Ablation, GRL without the dense map: no dense lesion-map loss, and the select logit does not start from the
    map's maximum (the head's weight on it starts at 0; the network keeps its shape)."""

    def dense_map_weight(self) -> float:
        return 0.0


class GFScreenTrainer_DiceReward(GFScreenTrainer):
    """Ablation: per-sub-volume Dice reward instead of the binary detection reward (both are 0 on a tile without
    lesion, so the Focus still predicts only the lesion tiles)."""

    def compute_rewards(self, pred_fg, gt_fg, valid):
        return dice_reward(pred_fg, gt_fg, valid)


class GFScreenTrainer_NoAlphaCE(GFScreenTrainer):
    """Ablation: GRL with the binary reward but without the class-balanced CE term (alpha = 0)."""

    def grl_alpha(self) -> float:
        return 0.0


class GFScreenTrainer_Group4(GFScreenTrainer):
    """Ablation: groups of 4 sub-volumes instead of 16."""
    settings_overrides = {"group_size": 4}
