"""GFScreenTrainer: nnU-Net's trainer with a Glance policy trained by GRL next to the Focus.

Per step (docs/method.md, sections 3 and 10): nnU-Net's Dice+CE on the Focus for nnU-Net's own batch (its sampling and
augmentation, unchanged); groups of N grid tiles per CT (`groups_per_step` CTs), which the Focus
predicts without gradient where a reward can depend on it (tiles holding lesion, each distinct crop once:
`focus_tiles`); a binary detection reward per tile; group-relative advantages; the GRL
loss (clipped ratio against a frozen reference Glance refreshed every epoch, k3 KL, class-balanced
CE) plus the Glance's dense lesion-map loss; L = L_seg + L_GRL + w * L_dense. The Glance that
trains (the policy) is averaged (EMA) into the network's Glance, which is what validation,
calibration and inference use (glance_training.py says why). Everything else (plans, data,
augmentation, schedule, logging, checkpoint layout, final validation) is nnU-Net's; the final
validation predicts with the gated sliding window of nnUNetv2_predict_gfscreen (final_validation.py).
Why the Focus batch is not taken from the group: group_sampling.py.

Longer than 300 lines because it is one class and nothing else: every nnU-Net hook it overrides (network,
optimisers, loaders, training and validation steps, epoch hooks, final validation, checkpoints, DDP set-up) and the
hooks of the Glance's objective that the ablation arms override (variants.py). Each hook is a few lines that hand
explicit inputs to a module of one concept: group_sampling (the groups), focus_passes (the Focus's reward passes),
core/grl (rewards and GRL), glance_training (the Glance's optimisation), final_validation (calibrate and validate
the deployed gate), ddp (several GPUs), checkpointing (atomic checkpoints with the Glance's state).
"""
import os
from copy import deepcopy
from typing import List, Optional, Union

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunetv2_gfscreen.core.gate import GateRule, select_tiles
from nnunetv2_gfscreen.core.glance import build_glance
from nnunetv2_gfscreen.core.grl import detection_reward, grl_loss
from nnunetv2_gfscreen.core.network import GFScreenNetwork, autocast_on_cuda, unwrap_gfscreen_network
from nnunetv2_gfscreen.nnunet_adapters import (dataloaders_with, per_rank_batch_and_loss, use_local_logger,
                                               use_pretrained_weights_loader)
from nnunetv2_gfscreen.plans.settings import GFScreenSettings
from nnunetv2_gfscreen.trainers.checkpointing import restore_training_state, save_checkpoint_atomically, training_state
from nnunetv2_gfscreen.trainers.ddp import (broadcast_from_rank0, cpu_under_gloo, gather_lists, gather_sum,
                                            gather_values, wrap_networks)
from nnunetv2_gfscreen.trainers.final_validation import calibrate_fold, validate_deployed_rule, write_gate_figures
from nnunetv2_gfscreen.trainers.focus_passes import predict_tiles, tiles_to_predict
from nnunetv2_gfscreen.trainers.group_sampling import GroupDataLoader, group_transforms
from nnunetv2_gfscreen.trainers.glance_training import (cosine_lr, dense_lesion_loss, ema_decay, ema_update,
                                                        intensity_augmentation, tile_confusion)
from nnunetv2_gfscreen.trainers.pretrained import load_pretrained_weights_gfscreen
from nnunetv2_gfscreen.trainers.progress_logging import GFScreenLocalLogger

# read by the static build_network_architecture from the plans, where a trainer attribute cannot reach
NETWORK_SETTINGS = ("glance_input_scale", "glance_base_features", "glance_dense_stage", "glance_logit_bound")


class GFScreenTrainer(nnUNetTrainer):
    """The full method. The ablation arms (variants.py) override one hook of the Glance's objective (`focus_tiles`,
    `compute_rewards`, `grl_alpha`, `glance_objective`, `dense_map_weight`, `dense_objective`); `settings_overrides`
    changes GF-Screen settings for a variant (not those that shape the network)."""
    settings_overrides: dict = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if cpu_under_gloo(device):  # DDP on the CPU (the tests): stay there, without AMP
            self.device, self.grad_scaler = device, None
        self._refuse_unsupported_modes()
        plans_settings = self.configuration_manager.configuration.get("gfscreen", {}) or {}
        self.gfscreen = GFScreenSettings.from_dict({**plans_settings, **self.settings_overrides})
        use_local_logger(self, GFScreenLocalLogger())
        use_pretrained_weights_loader(load_pretrained_weights_gfscreen)  # -pretrained_weights (pretrained.py)
        self.glance_optimizer: Optional[torch.optim.Optimizer] = None
        self.policy_glance: Optional[nn.Module] = None       # the Glance that GRL trains
        self.reference_glance: Optional[nn.Module] = None    # pi_ref, refreshed from the policy every epoch
        self._policy_wrapper: Optional[nn.Module] = None     # the policy's DDP wrapper under -num_gpus
        self.glance_ema_updates = 0
        self.nonfinite_steps = torch.zeros((), dtype=torch.long)  # per epoch, on the device (train_step)
        # which checkpoint the live weights are (load_checkpoint, on_train_end): its calibration is the one fitted
        self.weights_checkpoint = "checkpoint_final.pth"

    def _refuse_unsupported_modes(self):
        network_keys = sorted(set(self.settings_overrides) & set(NETWORK_SETTINGS))
        if network_keys:
            raise ValueError(f"{self.__class__.__name__}.settings_overrides sets {network_keys}, which shape the "
                             f"network that inference rebuilds from the plans alone; set them in the plans' "
                             f"gfscreen block instead (nnUNetv2_gfscreen_plan --set)")
        if self.label_manager.has_regions:
            raise NotImplementedError("GFScreenTrainer needs label-based training (FLARE-style 0/1 labels); "
                                      "region-based training is not supported")
        if self.is_cascaded:
            raise NotImplementedError("GFScreenTrainer does not support cascaded configurations")

    # ------------------------------------------------------------------ network and optimisers
    @staticmethod
    def build_network_architecture(plans_manager: PlansManager,
                                   configuration_manager: ConfigurationManager,
                                   num_input_channels: int,
                                   num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """The planned Focus network, unchanged, plus a Glance for the same patch size, in one module."""
        focus = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                         num_output_channels, enable_deep_supervision)
        settings = GFScreenSettings.from_configuration(configuration_manager.configuration)
        glance = build_glance(num_input_channels, configuration_manager.patch_size, settings.glance_input_scale,
                              settings.glance_base_features, settings.glance_dense_stage, settings.glance_logit_bound)
        return GFScreenNetwork(focus, glance, num_output_channels)

    def _gfscreen_network(self) -> GFScreenNetwork:
        return unwrap_gfscreen_network(self.network)

    def configure_optimizers(self):
        """nnU-Net's SGD + poly schedule for the Focus only; AdamW for the policy Glance (docs/method.md, section 3.6),
        whose learning rate follows `cosine_lr` per epoch."""
        net = self._gfscreen_network()
        optimizer = torch.optim.SGD(net.focus.parameters(), self.initial_lr, weight_decay=self.weight_decay,
                                    momentum=0.99, nesterov=True)
        lr_scheduler = PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)
        if self.dense_map_weight() == 0 and hasattr(net.glance, "detach_select_logit_from_dense_map"):
            net.glance.detach_select_logit_from_dense_map()  # without the dense map, it is no start for the logit
        # the network's Glance holds the average; the policy starts as a copy of it
        self.policy_glance = deepcopy(net.glance).requires_grad_(True)
        net.glance.requires_grad_(False)
        self.glance_optimizer = torch.optim.AdamW(self.policy_glance.parameters(), lr=self.gfscreen.glance_lr,
                                                  weight_decay=self.gfscreen.glance_weight_decay)
        return optimizer, lr_scheduler

    def initialize(self):
        """nnU-Net's single-process initialisation; under DDP then the per-rank batch and loss and the DDP wrappers
        of the network and of the policy Glance (ddp.py), which nnU-Net's own wrapping would not give the Glance."""
        ddp, self.is_ddp = self.is_ddp, False
        try:
            super().initialize()
        finally:
            self.is_ddp = ddp
        if ddp:
            per_rank_batch_and_loss(self)
            self.network, self._policy_wrapper = wrap_networks(self.network, self.policy_glance, self.device)
            self.print_to_log_file(f"DDP rank {self.local_rank}: Focus batch {self.batch_size}, "
                                   f"{self.gfscreen.groups_per_step} GRL groups per rank and step")
        self.reference_glance = deepcopy(self.policy_glance).requires_grad_(False)
        doc = (type(self).__doc__ or "").strip().splitlines()
        self.print_to_log_file(f"GF-Screen settings: {self.gfscreen.to_dict()}; trainer {type(self).__name__}"
                               + (f": {doc[0]}" if doc else ""))

    def refresh_reference_glance(self):
        """pi_ref <- pi. Both use normalisation that ignores train/eval mode, so the ratio is exactly 1 after."""
        self.reference_glance.load_state_dict(self.policy_glance.state_dict())

    def update_glance_average(self):
        """The network's (deployed) Glance <- EMA of the policy (`glance_ema_decay`; 0 copies the policy)."""
        decay = ema_decay(self.gfscreen.glance_ema_decay, self.glance_ema_updates)
        ema_update(self._gfscreen_network().glance, self.policy_glance, decay)
        self.glance_ema_updates += 1

    # ------------------------------------------------------------------ data
    def get_dataloaders(self):
        """nnU-Net's loaders, except that the training loader also draws the GRL groups (`build_group_loader`)."""
        return dataloaders_with(self, self.build_group_loader)

    def build_group_loader(self, dataset_tr, initial_patch_size, patch_size, tr_transforms,
                           mirror_axes) -> GroupDataLoader:
        """The training loader: nnU-Net's Focus batch plus the GRL groups (group_sampling.py); variants may
        return a subclass."""
        return GroupDataLoader(dataset_tr, self.batch_size, initial_patch_size, patch_size, self.label_manager,
                               self.oversample_foreground_percent, self.gfscreen.group_size,
                               self.gfscreen.groups_per_step, self.gfscreen.lesion_share, transforms=tr_transforms,
                               group_transforms=self.get_group_transforms(mirror_axes),
                               probabilistic_oversampling=self.probabilistic_oversampling,
                               tile_step_size=self.gfscreen.tile_step_size,
                               per_lesion=bool(self.gfscreen.lesion_slots_per_lesion),
                               dense_shape=self.dense_weight_shape())

    @staticmethod
    def get_group_transforms(mirror_axes) -> ComposeTransforms:
        """Transforms of the GRL group's sub-volumes (group_sampling.group_transforms)."""
        return group_transforms(mirror_axes)

    # ------------------------------------------------------------------ training
    def _autocast(self):
        return autocast_on_cuda(self.device)

    def _lesion_masks(self, target_full: torch.Tensor):
        """(gt lesion mask, valid mask) from the full-resolution target (B, 1, *patch)."""
        ignore = self.label_manager.ignore_label
        valid = (target_full != ignore) if ignore is not None else torch.ones_like(target_full, dtype=torch.bool)
        return (target_full > 0) & valid, valid

    @staticmethod
    def _foreground(logits: torch.Tensor) -> torch.Tensor:
        """Predicted lesion mask (B, 1, *patch) from softmax logits (B, K, *patch): argmax is a foreground class."""
        return logits.argmax(1, keepdim=True) > 0

    # ------------------------------------------------------------------ the Glance's objective: the arms' hooks
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

    def _to_device(self, data: torch.Tensor, target):
        """data and target (a tensor or nnU-Net's deep-supervision list) on the trainer's device."""
        target = [i.to(self.device, non_blocking=True) for i in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        return data.to(self.device, non_blocking=True), target

    def focus_loss(self, batch: dict) -> Optional[torch.Tensor]:
        """nnU-Net's Dice+CE of the Focus on nnU-Net's own batch (None: the Focus does not train, as in the retrofit)."""
        data, target = self._to_device(batch["data"], batch["target"])
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            return self.loss(self.network(data), target)

    def group_focus_predictions(self, batch: dict, group_data: torch.Tensor) -> torch.Tensor:
        """The Focus's lesion prediction of every group tile, from which the rewards come: predicted for the tiles
        a reward can depend on (`focus_tiles`), empty elsewhere."""
        with self._autocast():   # fp16 on CUDA; past the DDP wrapper: no gradient, ranks may differ in passes
            return predict_tiles(self.local_network(), group_data, self._foreground, self.batch_size,
                                 self.focus_tiles(batch), batch.get("group_source"))

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's Focus step on its own batch (`focus_loss`), plus the GRL step of the Glance on the batch's
        groups, rewarded by the Focus's predictions of them (`group_focus_predictions`)."""
        group_data = batch["group_data"].to(self.device, non_blocking=True)
        group_target = batch["group_target"].to(self.device, non_blocking=True)
        group_ids = batch["group_ids"].to(self.device, non_blocking=True)
        group_lesion = batch["group_lesion"].to(self.device, non_blocking=True) if "group_lesion" in batch else None

        self.glance_optimizer.zero_grad(set_to_none=True)
        seg_loss = self.focus_loss(batch)
        pred_fg = self.group_focus_predictions(batch, group_data)
        gt_fg, valid = self._lesion_masks(group_target)
        rewards = self.compute_rewards(pred_fg, gt_fg, valid)
        # the Glance's label: lesion in the tile's central region (group_sampling.py); any lesion voxel otherwise
        lesion = group_lesion if group_lesion is not None else gt_fg.flatten(1).any(1).float()
        net = self._gfscreen_network()
        glance_input = intensity_augmentation(group_data, self.gfscreen.glance_aug_p)
        with self._autocast():
            glance_logits, dense_logits = self.policy_forward(glance_input)  # through its DDP wrapper if any
            glance_logits = glance_logits.float()
            with torch.no_grad():
                ref_logits = self.reference_glance(glance_input).float()
        glance_terms = self.glance_objective(glance_logits, ref_logits, rewards, lesion, group_ids)
        dense_loss = self.dense_objective(dense_logits, gt_fg, batch)
        loss = glance_terms["grl_losses"] + self.dense_map_weight() * dense_loss
        trained = [(self.policy_glance, self.glance_optimizer)]
        if seg_loss is not None:
            loss = seg_loss + loss
            trained.append((net.focus, self.optimizer))

        # a non-finite loss (fp16 overflow of a logit) is not an error: the GradScaler skips the steps of the
        # optimisers whose gradients are not finite, as in nnU-Net; counted on the device, logged per epoch
        self.nonfinite_steps += ~torch.isfinite(loss.detach())
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            for module, opt in trained:
                self.grad_scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(module.parameters(), 12)
            for _, opt in trained:
                self.grad_scaler.step(opt)
            self.grad_scaler.update()
        elif torch.isfinite(loss):  # no scaler: CPU/MPS, where reading the value is no device synchronisation
            loss.backward()
            for module, opt in trained:
                torch.nn.utils.clip_grad_norm_(module.parameters(), 12)
                opt.step()
        self.update_glance_average()
        selected = select_tiles(glance_logits.detach().double(), net.gate.threshold, check_values=False)
        values = {"loss": loss, "seg_losses": loss.new_zeros(()) if seg_loss is None else seg_loss,
                  "glance_dense": dense_loss, "mean_reward": rewards.mean(),
                  "selection_ratio": selected.float().mean(), **glance_terms}
        # one transfer to the host for all of them (nnU-Net's own step reads its loss once, too)
        host = torch.stack([v.detach().float().reshape(()) for v in values.values()]).cpu().numpy()
        return {k: np.array(v) for k, v in zip(values, host)}

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.nonfinite_steps = torch.zeros((), dtype=torch.long, device=self.device)
        lr = cosine_lr(self.gfscreen.glance_lr, self.current_epoch, self.num_epochs)
        for group in self.glance_optimizer.param_groups:
            group["lr"] = lr
        self.refresh_reference_glance()

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        outputs = collate_outputs(train_outputs)
        skipped = int(self.nonfinite_steps)  # the epoch's one read of the counter
        if skipped:
            self.print_to_log_file(f"{skipped} of {len(train_outputs)} training steps had a non-finite loss (fp16 "
                                   f"overflow?): optimiser steps with non-finite gradients were skipped (GradScaler; "
                                   f"without one, the whole step); the epoch's means leave those values out")
        for key in ("seg_losses", "grl_clip", "grl_kl", "grl_ce", "grl_losses", "glance_dense", "mean_reward",
                    "selection_ratio"):
            values = np.asarray(gather_values(outputs[key]), dtype=np.float64)
            finite = values[np.isfinite(values)]
            self.logger.log(key, float(finite.mean()) if finite.size else float("nan"), self.current_epoch)

    def policy_forward(self, x: torch.Tensor):
        """(select logits, dense logits) of the policy Glance, through its DDP wrapper when there is one."""
        return self._policy_wrapper(x) if self._policy_wrapper is not None else self.policy_glance.forward_dense(x)

    def local_network(self) -> nn.Module:
        """The network without its DDP wrapper (still compiled if it was): for forwards that take no gradient and
        that ranks may run a different number of times."""
        return self.network.module if isinstance(self.network, DistributedDataParallel) else self.network

    def broadcast_from_rank0(self, obj):
        return broadcast_from_rank0(obj)

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self._gfscreen_network().gating_enabled = False  # online validation measures the Focus itself

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's validation step plus the Glance's tile confusion counts on the validation patches."""
        net = self._gfscreen_network()
        data, target = self._to_device(batch["data"], batch["target"])
        with self._autocast():
            selected = select_tiles(net.glance_logits(data), net.gate.threshold)
        lesion = self._lesion_masks(target[0] if isinstance(target, list) else target)[0].flatten(1).any(1)
        # tensors already on the device: nnU-Net's own .to() calls are then no-ops, not second copies
        out = super().validation_step({**batch, "data": data, "target": target})
        out["glance_counts"] = tile_confusion(selected, lesion)
        return out

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        super().on_validation_epoch_end(val_outputs)
        tp, fn, tn, fp = gather_sum(np.sum([o["glance_counts"] for o in val_outputs], axis=0))
        self.logger.log("glance_sensitivity", float(tp / (tp + fn)) if tp + fn else float("nan"), self.current_epoch)
        self.logger.log("glance_specificity", float(tn / (tn + fp)) if tn + fp else float("nan"), self.current_epoch)
        self._gfscreen_network().gating_enabled = True

    def on_epoch_end(self):
        get = lambda k: np.round(self.logger.get_value(k, step=-1), decimals=4)  # noqa: E731
        self.print_to_log_file(f"seg_loss {get('seg_losses')}, GRL {get('grl_losses')} (clip {get('grl_clip')}, "
                               f"kl {get('grl_kl')}, ce {get('grl_ce')}), Glance dense {get('glance_dense')}, "
                               f"mean reward {get('mean_reward')}, selection ratio {get('selection_ratio')}")
        self.print_to_log_file(f"Glance on validation patches: sensitivity {get('glance_sensitivity')}, "
                               f"specificity {get('glance_specificity')}")
        super().on_epoch_end()

    def on_train_end(self):
        super().on_train_end()
        self.weights_checkpoint = "checkpoint_final.pth"  # the live weights are the final ones now

    def perform_actual_validation(self, save_probabilities: bool = False):
        """Calibrate the gate of the loaded weights (checkpoint_best.pth with --val_best) on the validation cases,
        then nnU-Net's final validation predicted the way `nnUNetv2_predict_gfscreen` predicts, each case gated by
        the rule fitted on the other validation cases (final_validation.py). Writes nnU-Net's
        validation/summary.json and gfscreen_gate.json. Under DDP rank 0 calibrates, every rank predicts its share
        of the cases with the broadcast record, and rank 0 writes the gate figures of all of them."""
        net = self._gfscreen_network()
        record = broadcast_from_rank0(calibrate_fold(self, net, self.weights_checkpoint)
                                      if self.local_rank == 0 else None)
        if self.local_rank != 0:
            net.gate.set_rule(GateRule.from_dict(record["rule"]))
        cases = validate_deployed_rule(self, record, lambda: super(GFScreenTrainer, self)
                                       .perform_actual_validation(save_probabilities))
        cases = gather_lists(cases)
        if self.local_rank == 0:
            write_gate_figures(self, cases, self.weights_checkpoint, record)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint (Focus + Glance in `network_weights`) plus the Glance optimiser and pi_ref,
        written atomically (checkpointing.py): a kill leaves either the old or the complete new file."""
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)
        save_checkpoint_atomically(filename, super().save_checkpoint, training_state(self))

    def load_checkpoint(self, filename_or_checkpoint: Union[dict, str]) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        if isinstance(filename_or_checkpoint, str):
            self.weights_checkpoint = os.path.basename(filename_or_checkpoint)
        checkpoint = filename_or_checkpoint if isinstance(filename_or_checkpoint, dict) else \
            torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
        restore_training_state(self, checkpoint)
