"""GFScreenTrainer_Retrofit: add a Glance to an nnU-Net model that is already trained, without retraining it.

The Focus comes from the trained model (`-pretrained_weights`, loaded strictly by trainers/pretrained.py;
`nnUNetv2_gfscreen_retrofit` passes it) and is frozen: not in any optimiser, no gradient, no Focus step.
Because it never changes, its prediction of each training case is made once before training
(focus_cache.py) and every GRL reward is read from that cache: a group tile's reward is whether the
cached foreground overlaps the lesion inside the tile's box. Only the Glance trains (GRL with the
settings of the plans' gfscreen block, or the defaults), then the gate is calibrated exactly as in
GFScreenTrainer.

Augmentation: the group tiles are cut from the unaugmented case on the shifted sliding-window grid and not
mirrored (a mirrored tile would no longer line up with the cached prediction); the Glance's own intensity
augmentation (`glance_aug_p`) is kept. nnU-Net's Focus batch is not drawn at all.

No checkpoint_best.pth is written: nnU-Net picks it by the pseudo Dice of the (frozen) Focus, which says
nothing about the Glance. checkpoint_final.pth is the model.
"""
import os
import time
from typing import Dict, Optional

import numpy as np
import torch

from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

from nnunetv2_gfscreen.core.network import PretrainedFocus
from nnunetv2_gfscreen.trainers.GFScreenTrainer import GFScreenTrainer
from nnunetv2_gfscreen.trainers.focus_cache import build_focus_cache, cache_fingerprint, cache_folder, load_foreground
from nnunetv2_gfscreen.trainers.glance_training import cosine_lr
from nnunetv2_gfscreen.trainers.group_sampling import GroupDataLoader


class RetrofitGroupDataLoader(GroupDataLoader):
    """GRL groups only (no Focus batch), each tile with the cached Focus foreground cropped at its box.

    Adds `group_focus` (G*N, 1, *patch) bool to the group dict; `focus_files` maps case -> cache file.
    """

    def __init__(self, *args, focus_files: Optional[Dict[str, str]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.focus_files = dict(focus_files or {})

    def generate_train_batch(self):
        groups = self.generate_groups()
        n, size = self.group_size, self.final_patch_size
        focus = torch.zeros((len(groups["group_starts"]), 1, *size), dtype=torch.bool)
        for g, key in enumerate(groups["group_keys"]):
            if key not in self.focus_files:
                raise KeyError(f"no cached Focus prediction for training case {key!r}")
            foreground = load_foreground(self.focus_files[key])[None].astype(np.uint8)
            for i in range(g * n, (g + 1) * n):
                bbox = [[s, s + p] for s, p in zip(groups["group_starts"][i], size)]
                focus[i] = torch.from_numpy(crop_and_pad_nd(foreground, bbox, 0)).bool()
        groups["group_focus"] = focus
        return groups


class _CosineGlanceSchedule:
    """nnU-Net calls `lr_scheduler.step(epoch)` each epoch; for the retrofit that is the Glance's cosine decay."""

    def __init__(self, trainer: GFScreenTrainer):
        self.trainer = trainer

    def step(self, epoch: Optional[int] = None):
        lr = cosine_lr(self.trainer.gfscreen.glance_lr, epoch or 0, self.trainer.num_epochs)
        for group in self.trainer.glance_optimizer.param_groups:
            group["lr"] = lr


class GFScreenTrainer_Retrofit(GFScreenTrainer):
    """Only the Glance trains, against a frozen Focus from a trained nnU-Net model (see the module docstring)."""
    retrofit_epochs = 100

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.retrofit_epochs
        self.focus_files: Dict[str, str] = {}

    def initialize(self):
        super().initialize()
        net = self._gfscreen_network()
        net.pretrained_focus_strict = True     # -pretrained_weights: every Focus key, segmentation layers too
        net.focus.requires_grad_(False)

    def configure_optimizers(self):
        """The Glance's AdamW is nnU-Net's optimiser here (the Focus has none), with its cosine schedule."""
        super().configure_optimizers()
        return self.glance_optimizer, _CosineGlanceSchedule(self)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        net = self._gfscreen_network()
        axes = self.inference_allowed_mirroring_axes
        net.pretrained_focus = PretrainedFocus("resumed checkpoint", None if axes is None else tuple(axes))

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """nnU-Net's, except that inference mirrors as the source model did (stored with the checkpoint)."""
        out = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        net = self._gfscreen_network()
        if net.pretrained_focus is not None:
            self.inference_allowed_mirroring_axes = net.pretrained_focus.mirroring_axes
        return out

    def build_group_loader(self, dataset_tr, initial_patch_size, patch_size, tr_transforms, mirror_axes):
        return RetrofitGroupDataLoader(
            dataset_tr, self.batch_size, initial_patch_size, patch_size, self.label_manager,
            self.oversample_foreground_percent, self.gfscreen.group_size, self.gfscreen.groups_per_step,
            self.gfscreen.lesion_share, transforms=None, group_transforms=ComposeTransforms([RemoveLabelTansform(-1, 0)]),
            probabilistic_oversampling=self.probabilistic_oversampling, tile_step_size=self.gfscreen.tile_step_size,
            per_lesion=bool(self.gfscreen.lesion_slots_per_lesion), dense_shape=self.dense_weight_shape(),
            focus_files=self.focus_files)

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        net = self._gfscreen_network()
        if net.pretrained_focus is None:
            raise RuntimeError(f"{self.__class__.__name__} trains a Glance for an already trained Focus, but no Focus "
                               f"was loaded: run nnUNetv2_gfscreen_retrofit, or nnUNetv2_train with "
                               f"-pretrained_weights <trained model>/fold_X/checkpoint_final.pth")
        self.focus_files = self.prepare_focus_cache()
        super().on_train_start()

    def prepare_focus_cache(self) -> Dict[str, str]:
        """Predict each training case of this fold with the frozen Focus once (cached across runs)."""
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        tr_keys, _ = self.do_split()
        dataset = self.dataset_class(self.preprocessed_dataset_folder, list(tr_keys),
                                     folder_with_segs_from_previous_stage=self.folder_with_segs_from_previous_stage)
        net = self._gfscreen_network()
        patch_size = self.configuration_manager.patch_size
        fingerprint = cache_fingerprint(net.focus, patch_size, self.gfscreen.tile_step_size)
        folder = cache_folder(self.preprocessed_dataset_folder_base, self.configuration_manager.data_identifier,
                              fingerprint)
        deep_supervision = net.focus.decoder.deep_supervision
        net.focus.decoder.deep_supervision = False
        start = time.time()
        try:
            files = build_focus_cache(net.focus.eval(), dataset, list(dataset.identifiers), folder, fingerprint,
                                      self.plans_manager, self.configuration_manager, self.dataset_json,
                                      self.gfscreen.tile_step_size, self.device, log=self.print_to_log_file,
                                      source={"checkpoint": str(net.pretrained_focus.file)})
        finally:
            net.focus.decoder.deep_supervision = deep_supervision
        self.print_to_log_file(f"GF-Screen retrofit: Focus cache ready in {time.time() - start:.1f} s")
        return files

    def focus_loss(self, batch: dict) -> None:
        return None  # the Focus is frozen: no Focus batch, no Focus step

    def group_focus_predictions(self, batch: dict, group_data: torch.Tensor) -> torch.Tensor:
        """The frozen Focus's prediction of every group tile, cut from its cached dense prediction."""
        return batch["group_focus"].to(self.device, non_blocking=True)

    def save_checkpoint(self, filename: str) -> None:
        if os.path.basename(filename) == "checkpoint_best.pth":
            return     # chosen by the frozen Focus's pseudo Dice: meaningless for the Glance (module docstring)
        super().save_checkpoint(filename)
