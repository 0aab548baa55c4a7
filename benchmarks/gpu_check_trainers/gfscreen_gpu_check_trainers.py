"""Trainers of the GPU check (benchmarks/gpu_check.py), found by `nnUNetv2_train -tr` through nnUNet_extTrainer.

Both are the stock trainers with a short schedule (GFSCREEN_CHECK_EPOCHS x GFSCREEN_CHECK_ITERATIONS, plus
GFSCREEN_CHECK_VAL_ITERATIONS validation iterations) that write `gpu_check_metrics.json` into their output
folder: seconds of each epoch's training iterations and of its validation iterations (CUDA synchronised),
peak GPU memory of the training, and, for GF-Screen, the torch.compile graphs compiled during the final
validation, per validation case (the first case is the warm-up in eval mode without deep supervision; a graph
compiled in a later case is a recompilation). The nnU-Net baseline skips its final validation (not measured).
"""
import os
import time

import torch

from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2_gfscreen.atomic import write_json
from nnunetv2_gfscreen.trainers import GFScreenTrainer


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


class _CheckMixin:
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._make_check_schedule()

    def _make_check_schedule(self):
        self.num_epochs = int(os.environ.get("GFSCREEN_CHECK_EPOCHS", "2"))
        self.num_iterations_per_epoch = int(os.environ.get("GFSCREEN_CHECK_ITERATIONS", "20"))
        self.num_val_iterations_per_epoch = int(os.environ.get("GFSCREEN_CHECK_VAL_ITERATIONS", "5"))
        self.check = {"trainer": self.__class__.__name__, "device": str(self.device),
                      "iterations_per_epoch": self.num_iterations_per_epoch,
                      "val_iterations_per_epoch": self.num_val_iterations_per_epoch, "epochs": []}

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """GFSCREEN_CHECK_MIRRORING=0 (the CPU smoke run): no mirroring augmentation and no TTA in the final
        validation, as the project's short CPU trainers do."""
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if os.environ.get("GFSCREEN_CHECK_MIRRORING", "1") == "0":
            self.inference_allowed_mirroring_axes = mirror_axes = None
        return rotation, dummy_2d, initial_patch_size, mirror_axes

    def _write_check(self):
        if self.local_rank != 0:
            return
        write_json(self.check, os.path.join(self.output_folder, "gpu_check_metrics.json"), indent=2)

    def on_train_start(self):
        super().on_train_start()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.check["compile"] = bool(self._do_i_compile())

    def on_train_epoch_start(self):
        self._t_train = _now(self.device)
        super().on_train_epoch_start()

    def on_train_epoch_end(self, train_outputs):
        self._t_train = _now(self.device) - self._t_train
        super().on_train_epoch_end(train_outputs)

    def on_validation_epoch_start(self):
        self._t_val = _now(self.device)
        super().on_validation_epoch_start()

    def on_validation_epoch_end(self, val_outputs):
        super().on_validation_epoch_end(val_outputs)
        self.check["epochs"].append({"train_seconds": self._t_train, "val_seconds": _now(self.device) - self._t_val})

    def on_train_end(self):
        if self.device.type == "cuda":
            self.check["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        self.check["compiled_graphs_in_training"] = _compiled_graphs()
        self._write_check()
        super().on_train_end()


class nnUNetTrainer_GPUCheck(_CheckMixin, nnUNetTrainer):
    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("GPU check: the baseline's final validation is skipped")


class GFScreenTrainer_GPUCheck(_CheckMixin, GFScreenTrainer):
    def perform_actual_validation(self, save_probabilities: bool = False):
        """The trainer's final validation (calibration, then each case at its LOCO threshold), counting the
        torch.compile graphs compiled during each case's sliding window (nnU-Net's predictor, one call per case)."""
        per_case = []
        original = nnUNetPredictor.predict_sliding_window_return_logits

        def counting(predictor, data):
            before = _compiled_graphs()
            try:
                return original(predictor, data)
            finally:
                per_case.append(_compiled_graphs() - before)

        start, t0 = _compiled_graphs(), time.perf_counter()
        nnUNetPredictor.predict_sliding_window_return_logits = counting
        try:
            super().perform_actual_validation(save_probabilities)
        finally:
            nnUNetPredictor.predict_sliding_window_return_logits = original
        self.check["final_validation"] = {
            "seconds": time.perf_counter() - t0, "compiled_graphs": _compiled_graphs() - start,
            "compiled_graphs_per_case": per_case, "recompilations_after_first_case": sum(per_case[1:]),
            "threshold": float(self._gfscreen_network().gate.threshold)}
        self._write_check()
