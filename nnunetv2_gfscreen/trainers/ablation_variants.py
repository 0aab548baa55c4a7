"""Short versions of the ablation trainers, for `nnUNetv2_gfscreen_ablation --quick` on a CPU.

Every ablation arm gets the same short schedule, so the arms differ only in the switch their
full-length variant sets (variants.py). Group size stays the paper's 16 except in the group-4 arm.
"""
import torch

from nnunetv2_gfscreen.trainers.GFScreenTrainer import GFScreenTrainer
from nnunetv2_gfscreen.trainers.variants import (GFScreenTrainer_BalancedCE, GFScreenTrainer_DiceReward,
                                                 GFScreenTrainer_Group4, GFScreenTrainer_NoAlphaCE,
                                                 GFScreenTrainer_PlainCE, _ShortRun)


class _AblationShort(_ShortRun):
    """The shared short schedule: 10 epochs x 10 iterations, 2 validation iterations, no mirroring."""
    short_epochs = 10
    short_iterations = 10
    short_val_iterations = 2

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._make_short()


class GFScreenTrainer_Short(_AblationShort, GFScreenTrainer):
    """GRL + binary reward + alpha CE (the full method), short schedule."""


class GFScreenTrainer_PlainCE_Short(_AblationShort, GFScreenTrainer_PlainCE):
    """Plain CE Glance, short schedule."""


class GFScreenTrainer_BalancedCE_Short(_AblationShort, GFScreenTrainer_BalancedCE):
    """Class-balanced CE Glance, short schedule."""


class GFScreenTrainer_DiceReward_Short(_AblationShort, GFScreenTrainer_DiceReward):
    """GRL with the Dice reward, short schedule."""


class GFScreenTrainer_NoAlphaCE_Short(_AblationShort, GFScreenTrainer_NoAlphaCE):
    """GRL with the binary reward and no alpha CE, short schedule."""


class GFScreenTrainer_Group4_Short(_AblationShort, GFScreenTrainer_Group4):
    """The full method with groups of 4, short schedule."""
