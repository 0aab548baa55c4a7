"""How the Glance is optimised, apart from its GRL objective: pure helpers used by GFScreenTrainer.

- `cosine_lr`: the Glance's learning rate decays to 0 over the training (the paper's cosine schedule);
  a constant rate made the tile AUC swing between checkpoints in our CPU runs.
- `ema_update`: an exponential moving average of the Glance's weights. The averaged Glance is the one
  validated, calibrated and deployed (it lives in the network that nnU-Net checkpoints); the live
  policy keeps training. Averaging damps the step-to-step noise of a policy trained on a few CTs.
- `intensity_augmentation`: the Glance's input gets its own cheap intensity augmentation (contrast,
  brightness, noise) so that it does not key on the exact grey values of the training CTs.
- `dense_lesion_loss`: the Glance's dense head predicts a coarse lesion map; its target is the lesion
  mask max-pooled to the map's resolution (a map voxel is lesion if any voxel under it is).
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnunetv2_gfscreen.core.grl import balanced_bce


def cosine_lr(base_lr: float, epoch: int, num_epochs: int) -> float:
    """base_lr * (1 + cos(pi * epoch / num_epochs)) / 2: base_lr at epoch 0, 0 at num_epochs."""
    if num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
    progress = min(max(epoch, 0), num_epochs) / num_epochs
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_decay(decay: float, updates: int) -> float:
    """The decay used at update number `updates` (0-based): min(decay, (1 + u) / (10 + u)).

    The warm-up keeps the average from remembering the random initial weights for ~1/(1-decay) steps."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


@torch.no_grad()
def ema_update(average: nn.Module, live: nn.Module, decay: float) -> None:
    """average <- decay * average + (1 - decay) * live, parameters and floating buffers; other buffers copied."""
    for a, p in zip(average.parameters(), live.parameters()):
        a.lerp_(p.detach(), 1.0 - decay)
    for a, b in zip(average.buffers(), live.buffers()):
        if a.dtype.is_floating_point:
            a.lerp_(b, 1.0 - decay)
        else:
            a.copy_(b)


def intensity_augmentation(x: Tensor, p: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """Per tile with probability p: x * contrast + brightness + Gaussian noise, on x's device.

    x: (B, C, *spatial), z-scored CT (nnU-Net's normalisation). contrast ~ U(0.85, 1.15), brightness
    ~ U(-0.15, 0.15), noise sigma ~ U(0, 0.1). Returns a new tensor; x is not modified. Random numbers
    are drawn on x's device (a `generator` must live there too): this runs on every training step.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if p == 0.0:
        return x
    b = x.shape[0]
    shape = (b,) + (1,) * (x.ndim - 1)
    u = torch.rand((4, b), generator=generator, device=x.device)
    apply = (u[0] < p).to(x.dtype).view(shape)
    contrast = 1.0 + apply * (u[1].view(shape).to(x.dtype) * 0.3 - 0.15)
    brightness = apply * (u[2].view(shape).to(x.dtype) * 0.3 - 0.15)
    sigma = apply * u[3].view(shape).to(x.dtype) * 0.1
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x * contrast + brightness + sigma * noise


def dense_lesion_loss(dense_logits: Tensor, lesion: Tensor) -> Tensor:
    """Class-balanced BCE of the Glance's dense lesion map against the max-pooled lesion mask.

    dense_logits: (B, 1, d, h, w); lesion: (B, 1, D, H, W) bool, the tiles' full-resolution lesion mask.
    """
    if dense_logits.ndim != 5 or lesion.ndim != 5 or dense_logits.shape[:2] != lesion.shape[:2]:
        raise ValueError(f"expected (B, 1, *spatial) maps, got {tuple(dense_logits.shape)} and {tuple(lesion.shape)}")
    target = F.adaptive_max_pool3d(lesion.float(), dense_logits.shape[2:])
    return balanced_bce(dense_logits.float().flatten(), target.flatten(), check_values=False)  # 0/1 by construction
