"""Variants of GFScreenTrainer: the paper's ablation, and short runs for tests and the demo.

Each sets class attributes or a few numbers after `super().__init__()`, as nnU-Net's own variants do.
"""
import torch

from nnunetv2_gfscreen.trainers.GFScreenTrainer import GFScreenTrainer


class GFScreenTrainer_DiceReward(GFScreenTrainer):
    """Ablation: per-sub-volume Dice reward instead of the binary detection reward."""
    reward_kind = "dice"


class GFScreenTrainer_NoAlphaCE(GFScreenTrainer):
    """Ablation: GRL with the binary reward but without the class-balanced CE term."""
    use_alpha_ce = False


class GFScreenTrainer_PlainCE(GFScreenTrainer):
    """Ablation baseline: the Glance trained by plain binary CE on lesion presence (no GRL)."""
    glance_objective = "ce"


class GFScreenTrainer_BalancedCE(GFScreenTrainer):
    """Ablation baseline: the Glance trained by class-balanced CE only (no GRL)."""
    glance_objective = "balanced_ce"


class GFScreenTrainer_Group4(GFScreenTrainer):
    """Ablation: groups of 4 sub-volumes instead of 16."""
    settings_overrides = {"group_size": 4}


class _ShortRun:
    """Few epochs and iterations, no mirroring: for tests and the CPU demo."""
    short_epochs = 2
    short_iterations = 2
    short_val_iterations = 1

    def _make_short(self):
        self.num_epochs = self.short_epochs
        self.num_iterations_per_epoch = self.short_iterations
        self.num_val_iterations_per_epoch = self.short_val_iterations
        self.save_every = 1

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, None


class GFScreenTrainer_Tiny(_ShortRun, GFScreenTrainer):
    """2 epochs x 2 iterations, groups of 4: the end-to-end tests."""
    settings_overrides = {"group_size": 4}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._make_short()


class GFScreenTrainer_Demo(_ShortRun, GFScreenTrainer):
    """A CPU-sized run for the demo: 20 epochs x 20 iterations, groups of 8."""
    short_epochs = 20
    short_iterations = 20
    short_val_iterations = 4
    settings_overrides = {"group_size": 8}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._make_short()
        self.save_every = 5


class GFScreenTrainer_DemoLong(GFScreenTrainer_Demo):
    """The demo's trainer run four times longer (80 epochs x 20 iterations): benchmarks/learning_check.py."""
    short_epochs = 80
