"""Shim that nnU-Net's `nnUNet_extTrainer` lookup imports as a top-level module (the lab's trainers).

Only re-exports: the classes live in `gfscreen_lab.trainers`, so they are loaded once under their real module
names no matter how nnU-Net imports this file. Needs the repository root on PYTHONPATH (ext_trainer_env.py).
"""
from gfscreen_lab.trainers import *  # noqa: F401,F403
