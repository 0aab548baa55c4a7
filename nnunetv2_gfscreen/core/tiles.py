"""Tiles and their Glance scores: nnU-Net's sliding-window grid and batched scoring, shared by calibration
(core.calibration), the trainer's calibration hook and GFScreenPredictor, so all three see the same tiles."""
import itertools
from typing import List, Sequence

import torch

from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

from nnunetv2_gfscreen.core.network import GFScreenNetwork


def sliding_window_slicers(image_size: Sequence[int], patch_size: Sequence[int], tile_step_size: float) -> List[tuple]:
    """nnU-Net's 3D tiling (same steps and order as `nnUNetPredictor._internal_get_sliding_window_slicers`)."""
    steps = compute_steps_for_sliding_window(tuple(image_size), tuple(patch_size), tile_step_size)
    return [(slice(None), *[slice(s, s + p) for s, p in zip(start, patch_size)]) for start in itertools.product(*steps)]


@torch.inference_mode()
def score_tile_logits(network: GFScreenNetwork, data: torch.Tensor, slicers: Sequence[tuple], batch_size: int,
                      device: torch.device) -> torch.Tensor:
    """Glance select logit (`GFScreenNetwork.glance_logits`: the score of every path) for every tile.
    data: (C, *shape) (already padded); returns (len(slicers),) float64 on CPU.

    Tiles are scored in batches of `batch_size`; the Glance normalises per tile (InstanceNorm), so a
    score does not depend on which tiles share its batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    logits = []
    for start in range(0, len(slicers), batch_size):
        chunk = slicers[start:start + batch_size]
        x = torch.stack([data[s] for s in chunk]).to(device, non_blocking=True)
        logits.append(network.glance_logits(x).double().cpu())
    return torch.cat(logits) if logits else torch.zeros(0, dtype=torch.float64)
