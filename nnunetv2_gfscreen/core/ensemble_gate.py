"""One gate decision per case for a fold ensemble (`-f 0 1 2 3 4`).

If each fold gated on its own, a tile one fold selects would be predicted by that fold alone (the
others abstain with zero logits, so its false positives are not outvoted) and the Glance would run
once per fold. GFScreenPredictor instead scores each tile once with every fold's Glance, decides on
the mean logit over folds with the folds' pooled rule (`gate.pool_rules`: the mean threshold logit) and
runs every fold's Focus on the same tiles.
"""
from typing import Sequence

import torch

from nnunetv2_gfscreen.core.network import GFScreenNetwork
from nnunetv2_gfscreen.core.tiles import score_tile_logits

GLANCE_PREFIX = "glance."


@torch.inference_mode()
def score_tiles_over_folds(network: GFScreenNetwork, fold_parameters: Sequence[dict], data: torch.Tensor,
                           slicers: Sequence[tuple], batch_size: int, device: torch.device) -> torch.Tensor:
    """The mean over folds of the Glance logit of every tile: (len(slicers),) float64 on CPU.

    fold_parameters: each fold's full state_dict (nnU-Net's `list_of_parameters`); only the Glance part is
    loaded, and the network's own Glance is restored afterwards whatever fold it held.
    """
    if not fold_parameters:
        raise ValueError("no fold weights to score with")
    own = {k: v.detach().clone() for k, v in network.glance.state_dict().items()}
    logits = []
    try:
        for params in fold_parameters:
            network.glance.load_state_dict({k[len(GLANCE_PREFIX):]: v for k, v in params.items()
                                            if k.startswith(GLANCE_PREFIX)}, strict=True)
            logits.append(score_tile_logits(network, data, slicers, batch_size, device))
    finally:
        network.glance.load_state_dict(own)
    return torch.stack(logits).mean(dim=0)
