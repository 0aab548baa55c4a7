"""GF-Screen trainers; `-tr NAME` finds every class exported here (see ext_trainer/)."""
from nnunetv2_gfscreen.trainers.GFScreenTrainer import GFScreenTrainer
from nnunetv2_gfscreen.trainers.retrofit import GFScreenTrainer_Retrofit
from nnunetv2_gfscreen.trainers.variants import (
    GFScreenTrainer_DenseBalancedCE,
    GFScreenTrainer_DenseOnly,
    GFScreenTrainer_DiceReward,
    GFScreenTrainer_Group4,
    GFScreenTrainer_NoAlphaCE,
    GFScreenTrainer_NoDenseMap,
)

__all__ = ["GFScreenTrainer", "GFScreenTrainer_DenseBalancedCE", "GFScreenTrainer_DenseOnly",
           "GFScreenTrainer_DiceReward", "GFScreenTrainer_Group4", "GFScreenTrainer_NoAlphaCE",
           "GFScreenTrainer_NoDenseMap", "GFScreenTrainer_Retrofit"]
