"""The lab's short-schedule trainers: CPU-sized runs of the product's trainers for tests, the demo, the learning
check and `--quick` ablation runs. Not installed; nnU-Net finds them by `-tr NAME` through the lab's own
`nnUNet_extTrainer` folder (gfscreen_lab/ext_trainer/, see gfscreen_lab/ext_trainer_env.py).

`ShortSchedule` is the one mixin for shortened runs: `class MyRun(ShortSchedule, GFScreenTrainer_DiceReward):
short_epochs = 5` gives any arm a short run.
"""
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_gfscreen.trainers.GFScreenTrainer import GFScreenTrainer
from nnunetv2_gfscreen.trainers.retrofit import GFScreenTrainer_Retrofit
from nnunetv2_gfscreen.trainers.variants import (GFScreenTrainer_DenseBalancedCE, GFScreenTrainer_DenseOnly,
                                                 GFScreenTrainer_DiceReward, GFScreenTrainer_Group4,
                                                 GFScreenTrainer_NoAlphaCE, GFScreenTrainer_NoDenseMap)

ARMS = (GFScreenTrainer_DenseOnly, GFScreenTrainer_DenseBalancedCE, GFScreenTrainer_NoDenseMap,
        GFScreenTrainer_DiceReward, GFScreenTrainer_NoAlphaCE, GFScreenTrainer_Group4)


class ShortSchedule:
    """Mixin (put it first in the bases): `short_epochs` x `short_iterations`, a checkpoint every `save_every`
    epochs, no mirroring (neither in training nor at inference: a CPU cannot afford 8x TTA)."""
    short_epochs = 10
    short_iterations = 10
    short_val_iterations = 2
    short_save_every = 1

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.short_epochs
        self.num_iterations_per_epoch = self.short_iterations
        self.num_val_iterations_per_epoch = self.short_val_iterations
        self.save_every = self.short_save_every

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, None


class GFScreenTrainer_Tiny(ShortSchedule, GFScreenTrainer):
    """2 epochs x 2 iterations, groups of 4: the end-to-end tests."""
    short_epochs, short_iterations, short_val_iterations = 2, 2, 1
    settings_overrides = {"group_size": 4}


class GFScreenTrainer_Demo(ShortSchedule, GFScreenTrainer):
    """A CPU-sized run: 20 epochs x 20 iterations, groups of 8."""
    short_epochs, short_iterations, short_val_iterations, short_save_every = 20, 20, 4, 5
    settings_overrides = {"group_size": 8}


class GFScreenTrainer_DemoLong(GFScreenTrainer_Demo):
    """The Demo schedule four times longer (80 epochs x 20 iterations): benchmarks/learning_check.py, the
    shipped demo model."""
    short_epochs = 80


# Every ablation arm on three schedules, so that arms differ only in the hook their product class overrides:
# `<arm>_Short` (ShortSchedule's defaults; `python -m gfscreen_lab.experiments.ablation --quick`),
# `<arm>_DemoLong` (the method benchmark's schedule and settings: `benchmarks/learning_check.py --trainer`) and
# `<arm>_Demo` (the same settings, a quarter of the iterations: the ablation's one-sitting schedule, whose default
# arm is GFScreenTrainer_Demo).
class GFScreenTrainer_Short(ShortSchedule, GFScreenTrainer):
    """The full method (GRL + binary reward + alpha CE + dense map), short schedule."""


def _schedule_variant(arm: type, schedule: type, suffix: str) -> type:
    overrides = {**getattr(schedule, "settings_overrides", {}), **arm.settings_overrides}
    doc = f"{(arm.__doc__ or arm.__name__).strip().splitlines()[0]} ({suffix.strip('_')} schedule)"
    return type(arm.__name__ + suffix, (schedule, arm), {"settings_overrides": overrides, "__doc__": doc,
                                                          "__module__": __name__})


class _ShortArm(ShortSchedule):
    pass


class _DemoLongArm(ShortSchedule):
    short_epochs, short_iterations, short_val_iterations, short_save_every = \
        GFScreenTrainer_DemoLong.short_epochs, GFScreenTrainer_DemoLong.short_iterations, \
        GFScreenTrainer_DemoLong.short_val_iterations, GFScreenTrainer_DemoLong.short_save_every
    settings_overrides = dict(GFScreenTrainer_DemoLong.settings_overrides)


class _DemoArm(ShortSchedule):
    short_epochs, short_iterations, short_val_iterations, short_save_every = \
        GFScreenTrainer_Demo.short_epochs, GFScreenTrainer_Demo.short_iterations, \
        GFScreenTrainer_Demo.short_val_iterations, GFScreenTrainer_Demo.short_save_every
    settings_overrides = dict(GFScreenTrainer_Demo.settings_overrides)


ARM_VARIANTS = {}
for _arm in ARMS:
    for _schedule, _suffix in ((_ShortArm, "_Short"), (_DemoArm, "_Demo"), (_DemoLongArm, "_DemoLong")):
        _cls = _schedule_variant(_arm, _schedule, _suffix)
        ARM_VARIANTS[_cls.__name__] = _cls
        globals()[_cls.__name__] = _cls


__all__ = ["GFScreenTrainer_Tiny", "GFScreenTrainer_Demo", "GFScreenTrainer_DemoLong", "GFScreenTrainer_Short",
           *ARM_VARIANTS, "nnUNetTrainer_ShortCPU", "GFScreenTrainer_Retrofit_Tiny"]


# ---------------------------------------------------------------------- the retrofit test's two trainers
# nnU-Net's shortest stock variant, `nnUNetTrainer_1epoch`, still runs 250 iterations and a mirrored final
# validation (minutes on 2 CPU cores); this one is `nnUNetTrainer` with the short schedule of our test trainers.
class nnUNetTrainer_ShortCPU(ShortSchedule, nnUNetTrainer):
    """nnUNetTrainer, 2 epochs x 2 iterations, no mirroring: a plain (dense) model trained in seconds."""
    short_epochs, short_iterations, short_val_iterations = 2, 2, 1


class GFScreenTrainer_Retrofit_Tiny(GFScreenTrainer_Retrofit):
    """2 epochs x 2 iterations, groups of 4: the end-to-end test."""
    retrofit_epochs = 2
    settings_overrides = {"group_size": 4}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1
