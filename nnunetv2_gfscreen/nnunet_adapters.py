"""Every place where nnunetv2_gfscreen reaches into nnU-Net's internals, in one module.

Written for nnU-Net `NNUNET_VERSIONS` (setup.cfg pins the same range). Each adaptation says what it relies on
and why no public hook does the job; tests/test_nnunet_adapters.py checks each reliance against the installed
nnU-Net, so an upgrade that changes one fails a named test instead of misbehaving. Nothing here runs on import:
every replacement is installed by an explicit call, for as long as the caller needs it.
"""
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional

import torch

import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

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
