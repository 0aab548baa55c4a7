"""Atomic checkpoints: nnU-Net's `save_checkpoint` writes in place with `torch.save`, so a kill during the
write (a pre-empted cluster job, SIGKILL) leaves a truncated checkpoint_latest.pth that `--c` then fails to
load, or nnU-Net's file without our entry, which would restart the Glance's optimiser silently.

`save_checkpoint_atomically` lets nnU-Net write its dict to a temporary file, adds the GF-Screen entry, and
renames the result over the real name (os.replace is atomic on POSIX): a kill at any point leaves either
the previous complete file or the new complete one, plus at most a stale `.partial` file that the next save
of that checkpoint overwrites.
"""
import os
from typing import Callable

import torch

PARTIAL_SUFFIX = ".partial"


def save_checkpoint_atomically(filename: str, nnunet_save: Callable[[str], None], gfscreen_entry: dict) -> None:
    """nnunet_save(tmp) writes nnU-Net's checkpoint dict to tmp; `gfscreen_entry` is added under key 'gfscreen';
    then tmp replaces `filename`."""
    tmp = filename + PARTIAL_SUFFIX
    nnunet_save(tmp)
    checkpoint = torch.load(tmp, map_location="cpu", weights_only=False)
    checkpoint["gfscreen"] = gfscreen_entry
    torch.save(checkpoint, tmp)
    os.replace(tmp, filename)
