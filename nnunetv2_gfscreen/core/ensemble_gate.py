"""One gate decision per case for a fold ensemble (`-f 0 1 2 3 4`).

If each fold gated on its own, a tile one fold selects would be predicted by that fold alone (the
others abstain with zero logits, so its false positives are not outvoted) and the Glance would run
once per fold. GFScreenPredictor instead scores each tile once with every fold's Glance, selects on
the mean over folds and runs every fold's Focus on the same tiles.

Pooling: the mean of the folds' select *logits*, against the mean of the folds' threshold logits
(`pooled_threshold`). If the folds' Glances differed only by a constant shift of the logit, their
calibrated thresholds would shift with it and this pooled gate would select what each fold selects;
the minimum of the thresholds would be safer but selects more tiles than any fold at its own
calibrated sensitivity, the maximum fewer.
"""
from typing import Sequence

import torch

from nnunetv2_gfscreen.core.network import GFScreenNetwork
from nnunetv2_gfscreen.core.tiles import score_tile_logits


def pooled_threshold(thresholds: Sequence[float]) -> float:
    """sigmoid(mean_i logit(t_i)) in float64: the gate threshold of the folds' mean Glance logit."""
    if len(thresholds) == 0:
        raise ValueError("no fold thresholds to pool")
    t = torch.tensor([float(v) for v in thresholds], dtype=torch.float64)
    if torch.any((t < 0) | (t > 1)) or torch.isnan(t).any():
        raise ValueError(f"fold thresholds must be probabilities in [0, 1], got {t.tolist()}")
    pooled = torch.sigmoid(torch.logit(t).mean())
    if torch.isnan(pooled):
        raise ValueError(f"fold thresholds {t.tolist()} mix 0 (select every tile) and 1 (select none); "
                         f"set one with --threshold")
    return float(pooled)


@torch.inference_mode()
def score_tiles_over_folds(network: GFScreenNetwork, fold_parameters: Sequence[dict], data: torch.Tensor,
                           slicers: Sequence[tuple], batch_size: int, device: torch.device) -> torch.Tensor:
    """p(select) of every tile from the mean over folds of the Glance logit: (len(slicers),) float64 on CPU.

    fold_parameters: each fold's full state_dict (nnU-Net's `list_of_parameters`); only the Glance part is
    loaded, and the network's own Glance is restored afterwards whatever fold it held.
    """
    if not fold_parameters:
        raise ValueError("no fold weights to score with")
    own = network.glance_state()
    logits = []
    try:
        for params in fold_parameters:
            network.load_glance_state(params)
            logits.append(score_tile_logits(network, data, slicers, batch_size, device))
    finally:
        network.load_glance_state(own)
    return torch.sigmoid(torch.stack(logits).mean(dim=0))
