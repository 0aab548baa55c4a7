"""Atomic checkpoints: nnU-Net's `save_checkpoint` writes in place with `torch.save`, so a kill during the
write (a pre-empted cluster job, SIGKILL) leaves a truncated checkpoint_latest.pth that `--c` then fails to
load, or nnU-Net's file without our entry, which would restart the Glance's optimiser silently.

`save_checkpoint_atomically` lets nnU-Net write its dict to a temporary file, adds the GF-Screen entry, and
renames the result over the real name (os.replace is atomic on POSIX): a kill at any point leaves either
the previous complete file or the new complete one, plus at most a stale `.partial` file that the next save
of that checkpoint overwrites.
"""
from typing import Callable

import torch

from nnunetv2_gfscreen.atomic import atomic_path

PARTIAL_SUFFIX = ".partial"


def save_checkpoint_atomically(filename: str, nnunet_save: Callable[[str], None], gfscreen_entry: dict) -> None:
    """nnunet_save(tmp) writes nnU-Net's checkpoint dict to tmp; `gfscreen_entry` is added under key 'gfscreen';
    then tmp replaces `filename`."""
    with atomic_path(filename, tmp=filename + PARTIAL_SUFFIX) as tmp:
        nnunet_save(tmp)
        checkpoint = torch.load(tmp, map_location="cpu", weights_only=False)
        checkpoint["gfscreen"] = gfscreen_entry
        torch.save(checkpoint, tmp)


def training_state(trainer) -> dict:
    """The GF-Screen entry of a checkpoint: what `--c` needs beyond nnU-Net's dict (the network's Glance, the
    averaged one, is in `network_weights`)."""
    return {
        "glance_optimizer_state": trainer.glance_optimizer.state_dict(),
        "policy_glance": trainer.policy_glance.state_dict(),
        "glance_ema_updates": trainer.glance_ema_updates,
        "reference_glance": trainer.reference_glance.state_dict(),
        "settings": trainer.gfscreen.to_dict(),
    }


def restore_training_state(trainer, checkpoint: dict) -> None:
    """Policy Glance, its optimiser, the reference Glance and the EMA counter from `checkpoint['gfscreen']`; a
    checkpoint without the entry (e.g. nnU-Net's pretrained weights) starts them from its Glance."""
    extra = checkpoint.get("gfscreen")
    if extra is None or "policy_glance" not in extra:
        trainer.print_to_log_file("checkpoint has no GF-Screen training state: the policy Glance starts from the "
                                  "checkpoint's Glance, its optimiser and reference fresh")
        trainer.policy_glance.load_state_dict(trainer._gfscreen_network().glance.state_dict())
        trainer.refresh_reference_glance()
        return
    trainer.policy_glance.load_state_dict(extra["policy_glance"])
    trainer.glance_optimizer.load_state_dict(extra["glance_optimizer_state"])
    trainer.reference_glance.load_state_dict(extra["reference_glance"])
    trainer.glance_ema_updates = int(extra.get("glance_ema_updates", 0))
