"""Shim that nnU-Net's `nnUNet_extTrainer` lookup imports as a top-level module.

Only re-exports: the classes live in `nnunetv2_gfscreen.trainers`, so they are loaded once under
their real module names no matter how nnU-Net imports this file.
"""
from nnunetv2_gfscreen.trainers import *  # noqa: F401,F403
