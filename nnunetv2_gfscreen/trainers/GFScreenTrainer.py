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
"""
import os
from copy import deepcopy
from typing import List, Optional, Union

import numpy as np
import torch
from torch import nn

from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunetv2_gfscreen.core.gate import select_tiles
from nnunetv2_gfscreen.core.glance import build_glance
from nnunetv2_gfscreen.core.network import GFScreenNetwork, autocast_on_cuda, unwrap_gfscreen_network
from nnunetv2_gfscreen.nnunet_adapters import dataloaders_with, use_local_logger, use_pretrained_weights_loader
from nnunetv2_gfscreen.plans.settings import GFScreenSettings
from nnunetv2_gfscreen.trainers.ddp import GFScreenDDPMixin
from nnunetv2_gfscreen.trainers.checkpointing import restore_training_state, save_checkpoint_atomically, training_state
from nnunetv2_gfscreen.trainers.focus_passes import predict_tiles
from nnunetv2_gfscreen.trainers.group_sampling import GroupDataLoader, group_transforms
from nnunetv2_gfscreen.trainers.glance_training import cosine_lr, ema_decay, ema_update, intensity_augmentation
from nnunetv2_gfscreen.trainers.objectives import GlanceObjectiveMixin
from nnunetv2_gfscreen.trainers.pretrained import load_pretrained_weights_gfscreen
from nnunetv2_gfscreen.trainers.progress_logging import GFScreenLocalLogger
from nnunetv2_gfscreen.trainers.validation import GFScreenValidationMixin

# read by the static build_network_architecture from the plans, where a trainer attribute cannot reach
NETWORK_SETTINGS = ("glance_input_scale", "glance_base_features", "glance_dense_stage", "glance_logit_bound")


class GFScreenTrainer(GlanceObjectiveMixin, GFScreenValidationMixin, GFScreenDDPMixin, nnUNetTrainer):
    """The full method. The ablation arms (variants.py) override one hook of the Glance's objective (objectives.py:
    `compute_rewards`, `grl_alpha`, `glance_objective`, `dense_objective`); `settings_overrides` changes GF-Screen
    settings for a variant (not those that shape the network)."""
    settings_overrides: dict = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._keep_cpu_under_gloo(device)
        self._refuse_unsupported_modes()
        plans_settings = self.configuration_manager.configuration.get("gfscreen", {}) or {}
        self.gfscreen = GFScreenSettings.from_dict({**plans_settings, **self.settings_overrides})
        use_local_logger(self, GFScreenLocalLogger())
        use_pretrained_weights_loader(load_pretrained_weights_gfscreen)  # -pretrained_weights (pretrained.py)
        self.glance_optimizer: Optional[torch.optim.Optimizer] = None
        self.policy_glance: Optional[nn.Module] = None       # the Glance that GRL trains
        self.reference_glance: Optional[nn.Module] = None    # pi_ref, refreshed from the policy every epoch
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
        super().initialize()
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
        selected = select_tiles(glance_logits.detach().double(), net.gate.threshold)
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
            values = np.asarray(self.gather_values(outputs[key]), dtype=np.float64)
            finite = values[np.isfinite(values)]
            self.logger.log(key, float(finite.mean()) if finite.size else float("nan"), self.current_epoch)

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
