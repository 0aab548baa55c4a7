"""GFScreenTrainer: nnU-Net's trainer with a Glance policy trained by GRL next to the Focus.

Per step (METHOD.md): nnU-Net's Dice+CE on the Focus for nnU-Net's own batch (its sampling and
augmentation, unchanged); groups of N grid tiles per CT (`groups_per_step` CTs), which the Focus
predicts without gradient; a binary detection reward per tile; group-relative advantages; the GRL
loss (clipped ratio against a frozen reference Glance refreshed every epoch, k3 KL, class-balanced
CE) plus the Glance's dense lesion-map loss; L = L_seg + L_GRL + w * L_dense. The Glance that
trains (the policy) is averaged (EMA) into the network's Glance, which is what validation,
calibration and inference use (glance_training.py says why). Everything else (plans, data, augmentation, schedule, logging, checkpoint
layout, final validation) is nnU-Net's. Why the Focus batch is not taken from the group:
group_sampling.py.
"""
import os
from copy import deepcopy
from typing import List, Optional, Union

import numpy as np
import torch
from torch import autocast, nn

from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunetv2_gfscreen.core.glance import build_glance
from nnunetv2_gfscreen.core.grl import balanced_bce, detection_reward, dice_reward, grl_loss
from nnunetv2_gfscreen.core.network import GFScreenNetwork, unwrap_gfscreen_network
from nnunetv2_gfscreen.plans.settings import GFScreenSettings
from nnunetv2_gfscreen.trainers.calibration_hook import calibrate_trainer, loco_thresholds_during_validation
from nnunetv2_gfscreen.trainers.glance_training import (cosine_lr, dense_lesion_loss, ema_decay, ema_update,
                                                        intensity_augmentation)
from nnunetv2_gfscreen.trainers.group_sampling import GroupDataLoader
from nnunetv2_gfscreen.trainers.progress_logging import GFScreenLocalLogger

REWARDS = {"binary": detection_reward, "dice": dice_reward}
# read by the static build_network_architecture from the plans, where a trainer attribute cannot reach
NETWORK_SETTINGS = ("glance_input_scale", "glance_base_features", "glance_dense_stage", "threshold")
GLANCE_OBJECTIVES = ("grl", "ce", "balanced_ce")


class GFScreenTrainer(nnUNetTrainer):
    # ablation switches; variants override these (see variants.py)
    reward_kind: str = "binary"
    glance_objective: str = "grl"
    use_alpha_ce: bool = True
    settings_overrides: dict = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._refuse_unsupported_modes()
        plans_settings = self.configuration_manager.configuration.get("gfscreen", {}) or {}
        self.gfscreen = GFScreenSettings.from_dict({**plans_settings, **self.settings_overrides})
        self.logger.local_logger = GFScreenLocalLogger()
        self.glance_optimizer: Optional[torch.optim.Optimizer] = None
        self.policy_glance: Optional[nn.Module] = None       # the Glance that GRL trains
        self.reference_glance: Optional[nn.Module] = None    # pi_ref, refreshed from the policy every epoch
        self.glance_ema_updates = 0

    def _refuse_unsupported_modes(self):
        if self.reward_kind not in REWARDS or self.glance_objective not in GLANCE_OBJECTIVES:
            raise ValueError(f"{self.__class__.__name__}: reward_kind must be one of {tuple(REWARDS)} and "
                             f"glance_objective one of {GLANCE_OBJECTIVES}")
        network_keys = sorted(set(self.settings_overrides) & set(NETWORK_SETTINGS))
        if network_keys:
            raise ValueError(f"{self.__class__.__name__}.settings_overrides sets {network_keys}, which shape the "
                             f"network that inference rebuilds from the plans alone; set them in the plans' "
                             f"gfscreen block instead (nnUNetv2_gfscreen_plan --set)")
        if self.is_ddp:
            raise NotImplementedError("GFScreenTrainer does not support multi-GPU (DDP) training yet; "
                                      "train with one GPU")
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
                              settings.glance_base_features, settings.glance_dense_stage)
        return GFScreenNetwork(focus, glance, num_output_channels, threshold=settings.threshold)

    def _gfscreen_network(self) -> GFScreenNetwork:
        return unwrap_gfscreen_network(self.network)

    def configure_optimizers(self):
        """nnU-Net's SGD + poly schedule for the Focus only; AdamW for the policy Glance (METHOD.md step 7),
        whose learning rate follows `cosine_lr` per epoch."""
        net = self._gfscreen_network()
        optimizer = torch.optim.SGD(net.focus.parameters(), self.initial_lr, weight_decay=self.weight_decay,
                                    momentum=0.99, nesterov=True)
        lr_scheduler = PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)
        # the network's Glance holds the average; the policy starts as a copy of it
        self.policy_glance = deepcopy(net.glance).requires_grad_(True)
        net.glance.requires_grad_(False)
        self.glance_optimizer = torch.optim.AdamW(self.policy_glance.parameters(), lr=self.gfscreen.glance_lr,
                                                  weight_decay=self.gfscreen.glance_weight_decay)
        return optimizer, lr_scheduler

    def initialize(self):
        super().initialize()
        self.reference_glance = deepcopy(self.policy_glance).requires_grad_(False)
        self.print_to_log_file(f"GF-Screen settings: {self.gfscreen.to_dict()}; reward {self.reward_kind}, "
                               f"Glance objective {self.glance_objective}, alpha-CE {self.use_alpha_ce}")

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
        """nnU-Net's loaders, except that training batches are groups of sub-volumes per CT.

        nnU-Net hard-codes `nnUNetDataLoader` inside `get_dataloaders`, so the construction is
        repeated here with the group loader for training; transforms and augmenters are nnU-Net's.
        """
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        patch_size = self.configuration_manager.patch_size
        deep_supervision_scales = self._get_deep_supervision_scales()
        rotation_for_DA, do_dummy_2d_data_aug, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        regions = self.label_manager.foreground_regions if self.label_manager.has_regions else None
        tr_transforms = self.get_training_transforms(
            patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=self.is_cascaded,
            foreground_labels=self.label_manager.foreground_labels, regions=regions,
            ignore_label=self.label_manager.ignore_label)
        val_transforms = self.get_validation_transforms(
            deep_supervision_scales, is_cascaded=self.is_cascaded,
            foreground_labels=self.label_manager.foreground_labels, regions=regions,
            ignore_label=self.label_manager.ignore_label)
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        dl_tr = self.build_group_loader(dataset_tr, initial_patch_size, patch_size, tr_transforms, mirror_axes)
        dl_val = nnUNetDataLoader(dataset_val, self.batch_size, patch_size, patch_size, self.label_manager,
                                  oversample_foreground_percent=self.oversample_foreground_percent,
                                  transforms=val_transforms,
                                  probabilistic_oversampling=self.probabilistic_oversampling)
        n_proc = get_allowed_n_proc_DA()
        if n_proc == 0:
            mt_gen_train, mt_gen_val = SingleThreadedAugmenter(dl_tr, None), SingleThreadedAugmenter(dl_val, None)
        else:
            pin = self.device.type == "cuda"
            mt_gen_train = NonDetMultiThreadedAugmenter(dl_tr, None, n_proc, max(6, n_proc // 2), None, pin, 0.002)
            mt_gen_val = NonDetMultiThreadedAugmenter(dl_val, None, max(1, n_proc // 2), max(3, n_proc // 4), None,
                                                      pin, 0.002)
        _ = next(mt_gen_train)
        _ = next(mt_gen_val)
        return mt_gen_train, mt_gen_val

    def build_group_loader(self, dataset_tr, initial_patch_size, patch_size, tr_transforms,
                           mirror_axes) -> GroupDataLoader:
        """The training loader (nnU-Net's Focus batch plus the GRL groups); variants may return a subclass."""
        return GroupDataLoader(dataset_tr, self.batch_size, initial_patch_size, patch_size, self.label_manager,
                               self.oversample_foreground_percent, self.gfscreen.group_size,
                               self.gfscreen.groups_per_step, self.gfscreen.lesion_share, transforms=tr_transforms,
                               group_transforms=self.get_group_transforms(mirror_axes),
                               probabilistic_oversampling=self.probabilistic_oversampling,
                               tile_step_size=self.gfscreen.tile_step_size)

    @staticmethod
    def get_group_transforms(mirror_axes) -> ComposeTransforms:
        """Transforms of the GRL group's sub-volumes: mirroring (if the trainer mirrors) and nnU-Net's clean-up of
        the padding label; no intensity or spatial augmentation, so they look like the tiles seen at inference."""
        mirror = [MirrorTransform(allowed_axes=mirror_axes)] if mirror_axes else []
        return ComposeTransforms(mirror + [RemoveLabelTansform(-1, 0)])

    # ------------------------------------------------------------------ training
    def _autocast(self):
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def _lesion_masks(self, target_full: torch.Tensor):
        """(gt lesion mask, valid mask) from the full-resolution target (B, 1, *patch)."""
        ignore = self.label_manager.ignore_label
        valid = (target_full != ignore) if ignore is not None else torch.ones_like(target_full, dtype=torch.bool)
        return (target_full > 0) & valid, valid

    @staticmethod
    def _foreground(logits: torch.Tensor) -> torch.Tensor:
        """Predicted lesion mask (B, 1, *patch) from softmax logits (B, K, *patch): argmax is a foreground class."""
        return logits.argmax(1, keepdim=True) > 0

    @torch.no_grad()
    def _group_predictions(self, group_data: torch.Tensor) -> torch.Tensor:
        """The Focus's lesion prediction (G*N, 1, *patch) bool for every group sub-volume, without gradient,
        in chunks of the planned batch size (fp16 on CUDA)."""
        pred_fg = []
        with self._autocast():
            for chunk in torch.split(group_data, max(1, self.batch_size)):
                out = self.network(chunk)
                pred_fg.append(self._foreground(out[0] if isinstance(out, list) else out))
        return torch.cat(pred_fg)

    def _glance_loss(self, glance_logits, ref_logits, rewards, lesion, group_ids):
        """The Glance objective of this trainer (GRL, or the CE baselines of the paper's ablation)."""
        zero = glance_logits.new_zeros(())
        if self.glance_objective == "ce":
            ce = nn.functional.binary_cross_entropy_with_logits(glance_logits, lesion)
            return {"grl_clip": zero, "grl_kl": zero, "grl_ce": ce, "grl_losses": ce}
        if self.glance_objective == "balanced_ce":
            ce = balanced_bce(glance_logits, lesion)
            return {"grl_clip": zero, "grl_kl": zero, "grl_ce": ce, "grl_losses": ce}
        alpha = self.gfscreen.alpha if self.use_alpha_ce else 0.0
        terms = grl_loss(glance_logits, ref_logits, rewards, lesion, group_ids, clip_eps=self.gfscreen.clip_eps,
                         beta=self.gfscreen.beta, alpha=alpha, dual_clip=self.gfscreen.dual_clip or None)
        return {"grl_clip": terms.clip, "grl_kl": terms.kl, "grl_ce": terms.ce, "grl_losses": terms.total}

    def _to_device(self, data: torch.Tensor, target):
        """data and target (a tensor or nnU-Net's deep-supervision list) on the trainer's device."""
        target = [i.to(self.device, non_blocking=True) for i in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        return data.to(self.device, non_blocking=True), target

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's Focus step on its own batch, plus the GRL step of the Glance on the batch's groups."""
        data, target = self._to_device(batch["data"], batch["target"])
        group_data = batch["group_data"].to(self.device, non_blocking=True)
        group_target = batch["group_target"].to(self.device, non_blocking=True)
        group_ids = batch["group_ids"].to(self.device, non_blocking=True)
        group_lesion = batch["group_lesion"].to(self.device, non_blocking=True) if "group_lesion" in batch else None

        self.optimizer.zero_grad(set_to_none=True)
        self.glance_optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            seg_loss = self.loss(self.network(data), target)

        pred_fg = self._group_predictions(group_data)
        gt_fg, valid = self._lesion_masks(group_target)
        rewards = REWARDS[self.reward_kind](pred_fg, gt_fg, valid)
        # the Glance's label: lesion in the tile's central region (group_sampling.py); any lesion voxel otherwise
        lesion = group_lesion if group_lesion is not None else gt_fg.flatten(1).any(1).float()
        net = self._gfscreen_network()
        glance_input = intensity_augmentation(group_data, self.gfscreen.glance_aug_p)
        with self._autocast():
            glance_logits, dense_logits = self.policy_glance.forward_dense(glance_input)
            glance_logits = glance_logits.float()
            with torch.no_grad():
                ref_logits = self.reference_glance(glance_input).float()
        glance_terms = self._glance_loss(glance_logits, ref_logits, rewards, lesion, group_ids)
        dense_loss = dense_lesion_loss(dense_logits, gt_fg) if dense_logits is not None \
            else glance_logits.new_zeros(())
        loss = seg_loss + glance_terms["grl_losses"] + self.gfscreen.glance_dense_weight * dense_loss

        optimizers = (self.optimizer, self.glance_optimizer)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            for opt in optimizers:
                self.grad_scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.focus.parameters(), 12)
            torch.nn.utils.clip_grad_norm_(self.policy_glance.parameters(), 12)
            for opt in optimizers:
                self.grad_scaler.step(opt)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.focus.parameters(), 12)
            torch.nn.utils.clip_grad_norm_(self.policy_glance.parameters(), 12)
            for opt in optimizers:
                opt.step()
        self.update_glance_average()
        selected = torch.sigmoid(glance_logits.detach().double()) > net.threshold
        out = {"loss": loss.detach().cpu().numpy(), "seg_losses": seg_loss.detach().cpu().numpy(),
               "glance_dense": dense_loss.detach().cpu().numpy(),
               "mean_reward": rewards.mean().cpu().numpy(), "selection_ratio": selected.float().mean().cpu().numpy()}
        out.update({k: v.detach().cpu().numpy() for k, v in glance_terms.items()})
        return out

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        lr = cosine_lr(self.gfscreen.glance_lr, self.current_epoch, self.num_epochs)
        for group in self.glance_optimizer.param_groups:
            group["lr"] = lr
        self.refresh_reference_glance()

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        outputs = collate_outputs(train_outputs)
        for key in ("seg_losses", "grl_clip", "grl_kl", "grl_ce", "grl_losses", "glance_dense", "mean_reward",
                    "selection_ratio"):
            self.logger.log(key, float(np.mean(outputs[key])), self.current_epoch)

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self._gfscreen_network().gating_enabled = False  # online validation measures the Focus itself

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's validation step plus the Glance's tile confusion counts on the validation patches."""
        net = self._gfscreen_network()
        data, target = self._to_device(batch["data"], batch["target"])
        with self._autocast():
            selected = net.glance_probabilities(data) > net.threshold
        lesion = self._lesion_masks(target[0] if isinstance(target, list) else target)[0].flatten(1).any(1)
        # tensors already on the device: nnU-Net's own .to() calls are then no-ops, not second copies
        out = super().validation_step({**batch, "data": data, "target": target})
        out["glance_counts"] = np.array([(selected & lesion).sum().item(), (~selected & lesion).sum().item(),
                                         (~selected & ~lesion).sum().item(), (selected & ~lesion).sum().item()])
        return out

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        super().on_validation_epoch_end(val_outputs)
        tp, fn, tn, fp = np.sum([o["glance_counts"] for o in val_outputs], axis=0)
        self.logger.log("glance_sensitivity", float(tp / (tp + fn)) if tp + fn else float("nan"), self.current_epoch)
        self.logger.log("glance_specificity", float(tn / (tn + fp)) if tn + fp else float("nan"), self.current_epoch)
        self._gfscreen_network().gating_enabled = True

    def on_epoch_end(self):
        get = lambda k: np.round(self.logger.get_value(k, step=-1), decimals=4)
        self.print_to_log_file(f"seg_loss {get('seg_losses')}, GRL {get('grl_losses')} (clip {get('grl_clip')}, "
                               f"kl {get('grl_kl')}, ce {get('grl_ce')}), Glance dense {get('glance_dense')}, mean reward {get('mean_reward')}, "
                               f"selection ratio {get('selection_ratio')}")
        self.print_to_log_file(f"Glance on validation patches: sensitivity {get('glance_sensitivity')}, "
                               f"specificity {get('glance_specificity')}")
        super().on_epoch_end()

    def perform_actual_validation(self, save_probabilities: bool = False):
        """Calibrate the gate on the validation cases first (the all-cases threshold goes into the network and
        the checkpoints), then run nnU-Net's final validation with each case's leave-one-case-out threshold
        (fitted on the other validation cases), so no case is gated at a threshold tuned on itself."""
        if self.local_rank != 0:
            return super().perform_actual_validation(save_probabilities)
        result = calibrate_trainer(self)
        with loco_thresholds_during_validation(self, result):
            super().perform_actual_validation(save_probabilities)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint (Focus + Glance in `network_weights`) plus the Glance optimiser and pi_ref.

        nnU-Net writes its dict in one go with no extension hook, so we add our entry afterwards and
        replace the file atomically (a crash leaves either the old or the complete new file).
        """
        super().save_checkpoint(filename)
        if self.local_rank != 0 or self.disable_checkpointing:
            return
        checkpoint = torch.load(filename, map_location="cpu", weights_only=False)
        checkpoint["gfscreen"] = {
            "glance_optimizer_state": self.glance_optimizer.state_dict(),
            "policy_glance": self.policy_glance.state_dict(),
            "glance_ema_updates": self.glance_ema_updates,
            "reference_glance": self.reference_glance.state_dict(),
            "settings": self.gfscreen.to_dict(),
        }
        tmp = filename + ".tmp"
        torch.save(checkpoint, tmp)
        os.replace(tmp, filename)

    def load_checkpoint(self, filename_or_checkpoint: Union[dict, str]) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        checkpoint = filename_or_checkpoint if isinstance(filename_or_checkpoint, dict) else \
            torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
        extra = checkpoint.get("gfscreen")
        if extra is None or "policy_glance" not in extra:
            self.print_to_log_file("checkpoint has no GF-Screen training state: the policy Glance starts from the "
                                   "checkpoint's Glance, its optimiser and reference fresh")
            self.policy_glance.load_state_dict(self._gfscreen_network().glance.state_dict())
            self.refresh_reference_glance()
            return
        self.policy_glance.load_state_dict(extra["policy_glance"])
        self.glance_optimizer.load_state_dict(extra["glance_optimizer_state"])
        self.reference_glance.load_state_dict(extra["reference_glance"])
        self.glance_ema_updates = int(extra.get("glance_ema_updates", 0))
