"""The Glance's objective in GFScreenTrainer: the hooks that the ablation arms override (variants.py).

Per training step the trainer asks, in this order: which group tiles the Focus must predict for the rewards
(`focus_tiles`, focus_passes.py), the reward per tile (`compute_rewards`), the tile-level loss terms
(`glance_objective`, GRL with weight `grl_alpha` on its CE term), the dense lesion-map loss (`dense_objective`)
and its weight (`dense_map_weight`; at 0 the select logit also does not start from the map's maximum). An arm
overrides one of them and states what it changes against these defaults.
"""
from typing import Optional

import torch

from nnunetv2_gfscreen.core.grl import detection_reward, grl_loss
from nnunetv2_gfscreen.trainers.focus_passes import tiles_to_predict
from nnunetv2_gfscreen.trainers.glance_training import dense_lesion_loss


class GlanceObjectiveMixin:
    """Defaults: the binary detection reward, GRL with alpha-CE, the dense lesion-map loss (per-lesion weights)."""

    def focus_tiles(self, batch: dict) -> torch.Tensor:
        """(T,) long, on the host: the group tiles whose Focus prediction the rewards need (focus_passes.py): those
        holding valid lesion, each distinct crop once. A reward hook that can reward a tile without lesion must
        override this to return every tile."""
        return tiles_to_predict(batch, self.label_manager.ignore_label)

    def compute_rewards(self, pred_fg: torch.Tensor, gt_fg: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Reward per group tile (G*N,): the binary detection reward (docs/method.md, section 3.2)."""
        return detection_reward(pred_fg, gt_fg, valid)

    def grl_alpha(self) -> float:
        """Weight of GRL's class-balanced CE term."""
        return self.gfscreen.alpha

    def glance_objective(self, glance_logits, ref_logits, rewards, lesion, group_ids) -> dict:
        """The Glance's tile-level loss terms (grl_clip, grl_kl, grl_ce, grl_losses = their total): GRL."""
        terms = grl_loss(glance_logits, ref_logits, rewards, lesion, group_ids, clip_eps=self.gfscreen.clip_eps,
                         beta=self.gfscreen.beta, alpha=self.grl_alpha(), dual_clip=self.gfscreen.dual_clip or None,
                         check_values=False,  # no host sync; a non-finite loss is skipped in train_step
                         label_smoothing=self.gfscreen.glance_label_smoothing)
        return {"grl_clip": terms.clip, "grl_kl": terms.kl, "grl_ce": terms.ce, "grl_losses": terms.total}

    def dense_map_weight(self) -> float:
        """Weight of the dense lesion-map loss (`glance_dense_weight`). At 0 the Glance trains without the dense map:
        no dense loss, and its select logit does not start from the map's maximum (configure_optimizers)."""
        return self.gfscreen.glance_dense_weight

    def dense_weight_shape(self) -> Optional[tuple]:
        """The dense map's shape for which the group loader computes per-lesion weights (`group_dense_weight`), or
        None where the dense loss does not use them (`glance_dense_per_lesion` 0, weight 0, no dense head)."""
        if not self.gfscreen.glance_dense_per_lesion or self.dense_map_weight() == 0:
            return None
        return self._gfscreen_network().glance.dense_shape(self.configuration_manager.patch_size)

    def dense_objective(self, dense_logits: Optional[torch.Tensor], gt_fg: torch.Tensor, batch: dict) -> torch.Tensor:
        """The dense lesion-map loss, unweighted (train_step multiplies it by `glance_dense_weight`); 0 without a
        dense head. Every lesion of a tile counts equally (`group_dense_weight`) unless `glance_dense_per_lesion`
        is 0, where every map voxel does (class-balanced BCE)."""
        if dense_logits is None:
            return gt_fg.new_zeros((), dtype=torch.float32)
        weight = None
        if self.dense_weight_shape() is not None:
            if "group_dense_weight" not in batch:
                raise KeyError("glance_dense_per_lesion is on but the batch has no group_dense_weight: the group "
                               "loader needs dense_shape=trainer.dense_weight_shape()")
            weight = batch["group_dense_weight"].to(self.device, non_blocking=True)
        return dense_lesion_loss(dense_logits, gt_fg, weight, self.gfscreen.glance_label_smoothing)
