"""How the Glance is optimised, apart from its GRL objective: pure helpers used by GFScreenTrainer.

- `cosine_lr`: the Glance's learning rate decays to 0 over the training (the paper's cosine schedule);
  a constant rate made the tile AUC swing between checkpoints in our CPU runs.
- `ema_update`: an exponential moving average of the Glance's weights. The averaged Glance is the one
  validated, calibrated and deployed (it lives in the network that nnU-Net checkpoints); the live
  policy keeps training. Averaging damps the step-to-step noise of a policy trained on a few CTs.
- `intensity_augmentation`: the Glance's input gets its own cheap intensity augmentation (contrast,
  brightness, noise) so that it does not key on the exact grey values of the training CTs.
- `dense_lesion_loss`: the Glance's dense head predicts a coarse lesion map; its target is the lesion
  mask max-pooled to the map's resolution (a map voxel is lesion if any voxel under it is). With
  `lesion_map_weights` every lesion in a tile counts equally, not every map voxel: voxel-balanced, a
  large lesion's hundreds of map voxels drown a small lesion's one or two, and the map (whose maximum
  enters the select logit) learns the large lesions only.
"""
import math
from typing import Optional, Sequence

import numpy as np
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


def lesion_map_weights(lesion_ids: Tensor, map_shape: Sequence[int],
                       present: Optional[Sequence[Sequence[int]]] = None) -> Tensor:
    """Weights of the dense map's lesion voxels such that every lesion of a tile weighs 1: (B, 1, *map_shape).

    lesion_ids: (B, 1, D, H, W) integer, 0 where no lesion, k > 0 on the voxels of lesion k. A lesion's
    footprint on the map is its mask max-pooled as `dense_lesion_loss` pools the target; each of its n map
    voxels gets 1 / n, summed where lesions share a map voxel. present: per tile, the lesion ids it holds
    (found with torch.unique if None). Zero where the map voxel holds no lesion.
    """
    if lesion_ids.ndim != 5 or lesion_ids.shape[1] != 1:
        raise ValueError(f"expected lesion ids (B, 1, D, H, W), got {tuple(lesion_ids.shape)}")
    out = torch.zeros((lesion_ids.shape[0], 1, *map_shape), dtype=torch.float32, device=lesion_ids.device)
    for b in range(lesion_ids.shape[0]):
        ids = present[b] if present is not None else [int(i) for i in torch.unique(lesion_ids[b]) if i > 0]
        for k in ids:
            footprint = F.adaptive_max_pool3d((lesion_ids[b] == k).float(), tuple(map_shape))
            n = footprint.sum()
            if n > 0:
                out[b] += footprint / n
    return out


def dense_lesion_loss(dense_logits: Tensor, lesion: Tensor, positive_weight: Optional[Tensor] = None,
                      label_smoothing: float = 0.0) -> Tensor:
    """Class-balanced BCE of the Glance's dense lesion map against the max-pooled lesion mask.

    dense_logits: (B, 1, d, h, w); lesion: (B, 1, D, H, W) bool, the tiles' full-resolution lesion mask.
    Without `positive_weight`: 0.5 mean CE over the lesion map voxels + 0.5 mean CE over the others. With
    `positive_weight` (B, 1, d, h, w), e.g. `lesion_map_weights`: the lesion voxels' mean is weighted by it,
    ``sum(w * CE) / sum(w)``; the other voxels' mean is unchanged. With one class only, its mean is returned.
    `label_smoothing` e: CE targets 1 - e/2 and e/2 (core/grl.balanced_bce says why).
    """
    if dense_logits.ndim != 5 or lesion.ndim != 5 or dense_logits.shape[:2] != lesion.shape[:2]:
        raise ValueError(f"expected (B, 1, *spatial) maps, got {tuple(dense_logits.shape)} and {tuple(lesion.shape)}")
    target = F.adaptive_max_pool3d(lesion.float(), dense_logits.shape[2:])
    if positive_weight is None:   # 0/1 by construction: no value check
        return balanced_bce(dense_logits.float().flatten(), target.flatten(), check_values=False,
                            label_smoothing=label_smoothing)
    if positive_weight.shape != dense_logits.shape:
        raise ValueError(f"positive_weight must have the map's shape {tuple(dense_logits.shape)}, "
                         f"got {tuple(positive_weight.shape)}")
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    smoothed = target * (1 - label_smoothing) + 0.5 * label_smoothing
    ce = F.binary_cross_entropy_with_logits(dense_logits.float(), smoothed, reduction='none')
    pos = target > 0
    w = positive_weight.float() * pos
    n_neg = (~pos).sum()
    pos_mean = (ce * w).sum() / w.sum().clamp_min(1e-12)
    neg_mean = (ce * ~pos).sum() / n_neg.clamp_min(1)
    # written without branching on values (no host synchronisation)
    return torch.where(w.sum() == 0, neg_mean, torch.where(n_neg == 0, pos_mean, 0.5 * pos_mean + 0.5 * neg_mean))


def tile_confusion(selected: Tensor, lesion: Tensor) -> np.ndarray:
    """[tp, fn, tn, fp] of the Glance's selection (B,) bool against lesion presence (B,) bool."""
    return np.array([int((selected & lesion).sum()), int((~selected & lesion).sum()),
                     int((~selected & ~lesion).sum()), int((selected & ~lesion).sum())])
