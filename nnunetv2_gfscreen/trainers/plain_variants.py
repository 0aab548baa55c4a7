"""A plain nnU-Net trainer (no Glance) for short CPU runs: the source model of the retrofit test and benchmark.

nnU-Net's shortest stock variant, `nnUNetTrainer_1epoch`, still runs 250 iterations and a mirrored final
validation (minutes on 2 CPU cores); this one is `nnUNetTrainer` with the short schedule of our test trainers.
"""
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_gfscreen.trainers.variants import _ShortRun


class nnUNetTrainer_ShortCPU(_ShortRun, nnUNetTrainer):
    """nnUNetTrainer, 2 epochs x 2 iterations, no mirroring: a plain (dense) model trained in seconds."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._make_short()
