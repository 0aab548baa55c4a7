"""GF-Screen (glance-and-focus reinforcement learning for pan-cancer CT screening) for nnU-Net v2.

Kept import-light on purpose: `ext_trainer_env` is imported at every interpreter start.
"""
__version__ = "0.1.0"
