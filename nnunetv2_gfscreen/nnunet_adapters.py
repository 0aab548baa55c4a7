"""Every place where nnunetv2_gfscreen reaches into nnU-Net's internals, in one module.

Written for nnU-Net `NNUNET_VERSIONS` (setup.cfg pins the same range). Each adaptation says what it relies on
and why no public hook does the job; tests/test_nnunet_adapters.py checks each reliance against the installed
nnU-Net, so an upgrade that changes one fails a named test instead of misbehaving. Nothing here runs on import:
every replacement is installed by an explicit call, for as long as the caller needs it.
"""
import os
import re
from contextlib import contextmanager
from functools import lru_cache
from typing import Callable, Iterator, Optional, Tuple

import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter

import nnunetv2
import nnunetv2.run.run_training as nnunet_run_training
import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
import nnunetv2.utilities.find_objects as nnunet_find_objects
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

NNUNET_VERSIONS = ">=2.8.1,<2.9"


class CaseCursor:
    """The identifier of the case nnU-Net's final validation is predicting (`current`; None between cases)."""

    def __init__(self):
        self.current: Optional[str] = None


@contextmanager
def final_validation_with(trainer, predictor_class: type) -> Iterator[CaseCursor]:
    """Run nnU-Net's `perform_actual_validation` with `predictor_class` instead of `nnUNetPredictor`, and know
    which case it predicts.

    Relies on: `nnUNetTrainer.perform_actual_validation` builds its predictor as `nnUNetPredictor(...)` by the
    name its module imported (so substituting that module attribute for the duration of the call swaps the
    class, with its 100 lines of worker pool, export, DDP and summary.json left as they are), and loads each
    case through `self.dataset_class(...).load_case(k)` right before predicting it (so a subclass of the
    dataset class records k). nnU-Net has no hook for either.
    """
    cursor = CaseCursor()
    base = trainer.dataset_class

    def load_case(self, identifier):
        loaded = base.load_case(self, identifier)
        cursor.current = identifier
        return loaded

    original = nnunet_trainer_module.nnUNetPredictor
    trainer.dataset_class = type(f"CaseCursor{base.__name__}", (base,), {"load_case": load_case})
    nnunet_trainer_module.nnUNetPredictor = predictor_class
    try:
        yield cursor
    finally:
        nnunet_trainer_module.nnUNetPredictor = original
        trainer.dataset_class = base


NNUNET_TRAINER_FOLDER = os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer")


@lru_cache(maxsize=None)
def nnunet_trainer_folder_may_hold(name: str) -> bool:
    """Whether a module of nnU-Net's own trainer folder could have an attribute `name`: a Python module gets one
    only by naming it (a class, a function, an import), so False when no source file there contains the word;
    True when one does, or when the folder holds a module that is not Python source (then nobody can tell)."""
    word = re.compile(rf"\b{re.escape(name)}\b")
    for folder, subfolders, files in os.walk(NNUNET_TRAINER_FOLDER):
        subfolders[:] = [d for d in subfolders if d != "__pycache__"]
        for f in files:
            if f.endswith((".so", ".pyd", ".pyc")):
                return True
            if f.endswith(".py"):
                with open(os.path.join(folder, f), encoding="utf-8", errors="replace") as source:
                    if word.search(source.read()):
                        return True
    return False


@contextmanager
def trainer_lookup_past_nnunet_folder() -> Iterator[None]:
    """While open, nnU-Net's trainer lookup goes straight to the `nnUNet_extTrainer` folders for a trainer name that
    nnU-Net's own trainer folder cannot hold (`nnunet_trainer_folder_may_hold`), which is where it goes when its
    search of that folder finds nothing: the class found is the one nnU-Net finds.

    Why: that search imports every module of the folder to look for the name (all of nnU-Net's trainer variants,
    and with them timm, torchvision and huggingface_hub, some 670 modules), and for a GF-Screen trainer it can only
    come back empty; a prediction command paid for it in start-up time and memory.

    Relies on: `find_objects.recursive_find_trainer_class_by_name` (which `initialize_from_trained_model_folder`
    calls) searches by calling `recursive_find_python_class`, the name its module imported, first on nnU-Net's
    trainer folder, then, when that returns None, on each nnUNet_extTrainer folder."""
    original = nnunet_find_objects.recursive_find_python_class

    def search(folder, class_name, *args, **kwargs):
        if os.path.abspath(folder) == os.path.abspath(NNUNET_TRAINER_FOLDER) and \
                not nnunet_trainer_folder_may_hold(class_name):
            return None
        return original(folder, class_name, *args, **kwargs)

    nnunet_find_objects.recursive_find_python_class = search
    try:
        yield
    finally:
        nnunet_find_objects.recursive_find_python_class = original


class PredictorHooks(nnUNetPredictor):
    """nnU-Net's predictor with the private steps we build on under public names.

    Relies on: `predict_sliding_window_return_logits` pads the case, computes the tiles and hands them to
    `_internal_predict_sliding_window_return_logits(data, slicers, do_on_device)` (and retries that on the CPU
    after an out-of-memory error), which we override as `sliding_window`; `_internal_maybe_mirror_and_predict(x)`
    runs the network on a batch of tiles with nnU-Net's mirroring TTA (`mirror_and_predict`);
    `_manage_input_and_output_lists` lists a folder's cases as `nnUNetv2_predict` does (`case_lists`). nnU-Net
    exposes none of them publicly, and copying them would fork its padding, OOM and TTA logic.
    """

    def _internal_predict_sliding_window_return_logits(self, data: torch.Tensor, slicers, do_on_device: bool = True):
        return self.sliding_window(data, slicers, do_on_device)

    def sliding_window(self, data: torch.Tensor, slicers, do_on_device: bool = True) -> torch.Tensor:
        """nnU-Net's own loop over `slicers` (every tile, one at a time); subclasses replace it."""
        return super()._internal_predict_sliding_window_return_logits(data, slicers, do_on_device)

    def mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        """The network on x (B, C, *patch) with nnU-Net's mirroring TTA (when the predictor mirrors)."""
        return self._internal_maybe_mirror_and_predict(x)

    def case_lists(self, input_folder: str, output_folder: str, overwrite: bool, part_id: int, num_parts: int,
                   save_probabilities: bool):
        """(image file lists, output file names without ending, previous-stage files) of a folder, as
        nnUNetv2_predict lists them (skipping finished cases unless `overwrite`)."""
        return self._manage_input_and_output_lists(input_folder, output_folder, None, overwrite, part_id, num_parts,
                                                   save_probabilities)


# ---------------------------------------------------------------------- training
def dataloaders_with(trainer, build_train_loader: Callable) -> Tuple[object, object]:
    """nnU-Net's `nnUNetTrainer.get_dataloaders`, with the training data loader built by
    `build_train_loader(dataset_tr, initial_patch_size, patch_size, tr_transforms, mirror_axes)`.

    Relies on: the transforms, the validation loader and the augmenters that `get_dataloaders` builds (nnU-Net
    2.8 constructs `nnUNetDataLoader` inside the method, with no hook for another loader class, so its ~30 lines
    are repeated here) and `_get_deep_supervision_scales`."""
    if trainer.dataset_class is None:
        trainer.dataset_class = infer_dataset_class(trainer.preprocessed_dataset_folder)
    patch_size = trainer.configuration_manager.patch_size
    deep_supervision_scales = trainer._get_deep_supervision_scales()
    rotation_for_DA, do_dummy_2d_data_aug, initial_patch_size, mirror_axes = \
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    regions = trainer.label_manager.foreground_regions if trainer.label_manager.has_regions else None
    tr_transforms = trainer.get_training_transforms(
        patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
        use_mask_for_norm=trainer.configuration_manager.use_mask_for_norm, is_cascaded=trainer.is_cascaded,
        foreground_labels=trainer.label_manager.foreground_labels, regions=regions,
        ignore_label=trainer.label_manager.ignore_label)
    val_transforms = trainer.get_validation_transforms(
        deep_supervision_scales, is_cascaded=trainer.is_cascaded,
        foreground_labels=trainer.label_manager.foreground_labels, regions=regions,
        ignore_label=trainer.label_manager.ignore_label)
    dataset_tr, dataset_val = trainer.get_tr_and_val_datasets()
    dl_tr = build_train_loader(dataset_tr, initial_patch_size, patch_size, tr_transforms, mirror_axes)
    dl_val = nnUNetDataLoader(dataset_val, trainer.batch_size, patch_size, patch_size, trainer.label_manager,
                              oversample_foreground_percent=trainer.oversample_foreground_percent,
                              transforms=val_transforms, probabilistic_oversampling=trainer.probabilistic_oversampling)
    n_proc = get_allowed_n_proc_DA()
    if n_proc == 0:
        mt_gen_train, mt_gen_val = SingleThreadedAugmenter(dl_tr, None), SingleThreadedAugmenter(dl_val, None)
    else:
        pin = trainer.device.type == "cuda"
        mt_gen_train = NonDetMultiThreadedAugmenter(dl_tr, None, n_proc, max(6, n_proc // 2), None, pin, 0.002)
        mt_gen_val = NonDetMultiThreadedAugmenter(dl_val, None, max(1, n_proc // 2), max(3, n_proc // 4), None,
                                                  pin, 0.002)
    _ = next(mt_gen_train)
    _ = next(mt_gen_val)
    return mt_gen_train, mt_gen_val


def per_rank_batch_and_loss(trainer) -> None:
    """nnU-Net's DDP set-up of the Focus: each rank's share of the batch and oversampling, and the loss whose
    Dice terms are gathered across ranks. Relies on `_set_batch_size_and_oversample` and `_build_loss` (which
    `initialize` calls only when `is_ddp` is set while it runs; GF-Screen wraps its two networks itself)."""
    trainer._set_batch_size_and_oversample()
    trainer.loss = trainer._build_loss()


def use_local_logger(trainer, local_logger) -> None:
    """Log through `local_logger` (a subclass of nnU-Net's LocalLogger that knows GF-Screen's keys). Relies on
    nnU-Net's MetaLogger delegating log/get_value/plot/checkpoint to its `local_logger` attribute."""
    trainer.logger.local_logger = local_logger


def use_pretrained_weights_loader(loader: Callable) -> None:
    """Make `nnUNetv2_train -pretrained_weights` call `loader(network, fname, verbose)` (idempotent).

    Relies on: `run_training.maybe_load_checkpoint` calls the module-level `load_pretrained_weights` of
    nnunetv2.run.run_training, with no hook; nnU-Net's function asserts that every key of the network is in the
    file, which a GFScreenNetwork (keys focus.*, glance.*, gate.*) never satisfies for a plain nnU-Net checkpoint.
    GFScreenTrainer installs it when it is constructed (run_training constructs the trainer before it loads
    weights); `loader` passes every other network to nnU-Net's own function."""
    if nnunet_run_training.load_pretrained_weights is not loader:
        nnunet_run_training.load_pretrained_weights = loader
