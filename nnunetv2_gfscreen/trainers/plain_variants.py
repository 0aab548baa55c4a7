"""A plain nnU-Net trainer (no Glance) for short CPU runs: the source model of the retrofit test and benchmark.

nnU-Net's shortest stock variant, `nnUNetTrainer_1epoch`, still runs 250 iterations and a mirrored final
validation (minutes on 2 CPU cores); this one is `nnUNetTrainer` with the short schedule of our test trainers.
"""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_gfscreen.trainers.variants import ShortSchedule


class nnUNetTrainer_ShortCPU(ShortSchedule, nnUNetTrainer):
    """nnUNetTrainer, 2 epochs x 2 iterations, no mirroring: a plain (dense) model trained in seconds."""
    short_epochs, short_iterations, short_val_iterations = 2, 2, 1
