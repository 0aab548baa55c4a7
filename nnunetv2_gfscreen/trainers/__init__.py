"""GF-Screen trainers; `-tr NAME` finds every class exported here (see ext_trainer/)."""
from nnunetv2_gfscreen.trainers import pretrained
from nnunetv2_gfscreen.trainers.GFScreenTrainer import GFScreenTrainer
from nnunetv2_gfscreen.trainers.plain_variants import nnUNetTrainer_ShortCPU
from nnunetv2_gfscreen.trainers.retrofit import GFScreenTrainer_Retrofit, GFScreenTrainer_Retrofit_Tiny
from nnunetv2_gfscreen.trainers.variants import (
    GFScreenTrainer_BalancedCE,
    GFScreenTrainer_BalancedCE_Short,
    GFScreenTrainer_Demo,
    GFScreenTrainer_DemoLong,
    GFScreenTrainer_DiceReward,
    GFScreenTrainer_DiceReward_Short,
    GFScreenTrainer_Group4,
    GFScreenTrainer_Group4_Short,
    GFScreenTrainer_NoAlphaCE,
    GFScreenTrainer_NoAlphaCE_Short,
    GFScreenTrainer_PlainCE,
    GFScreenTrainer_PlainCE_Short,
    GFScreenTrainer_Short,
    GFScreenTrainer_Tiny,
)

__all__ = ["GFScreenTrainer", "GFScreenTrainer_BalancedCE", "GFScreenTrainer_Demo", "GFScreenTrainer_DemoLong",
           "GFScreenTrainer_DiceReward", "GFScreenTrainer_Group4", "GFScreenTrainer_NoAlphaCE",
           "GFScreenTrainer_PlainCE", "GFScreenTrainer_Tiny", "GFScreenTrainer_Short",
           "GFScreenTrainer_PlainCE_Short", "GFScreenTrainer_BalancedCE_Short", "GFScreenTrainer_DiceReward_Short",
           "GFScreenTrainer_NoAlphaCE_Short", "GFScreenTrainer_Group4_Short",
           "GFScreenTrainer_Retrofit", "GFScreenTrainer_Retrofit_Tiny", "nnUNetTrainer_ShortCPU"]

# `-pretrained_weights` from a plain nnU-Net checkpoint into the Focus (see pretrained.py for why this is a wrapper)
pretrained.install()

