"""The Focus's group passes, from which GRL's rewards come: only where a reward can depend on them.

The binary detection reward (and the Dice reward of the ablation) is 0 on a tile whose valid ground truth
holds no lesion voxel, whatever the Focus predicts there (core/grl.py). Predicting every group tile
(2 groups x 16 tiles per step by default) to compute rewards that are 0 anyway cost more than the Focus's own
training step, so the Focus predicts the tiles holding lesion only, and a crop that the group repeats (a case
with fewer lesion tiles than lesion slots) once. The rewards are exactly those of predicting every tile.
"""
from typing import Callable, Optional

import torch
from torch import nn

from nnunetv2_gfscreen.trainers.group_sampling import holds_lesion


def tiles_to_predict(batch: dict, ignore_label: Optional[int]) -> torch.Tensor:
    """(T,) long, on the host: the group tiles holding valid lesion, each distinct crop once.

    Reads the loader's `group_lesion_anywhere` and `group_source` (group_sampling.py); without them, tests the
    targets and treats every crop as distinct."""
    anywhere = batch.get("group_lesion_anywhere")
    if anywhere is None:
        anywhere = holds_lesion(batch["group_target"], ignore_label)
    n = anywhere.shape[0]
    source = batch.get("group_source", torch.arange(n))
    return torch.nonzero(anywhere.cpu() & (source.cpu() == torch.arange(n))).flatten()


@torch.no_grad()
def predict_tiles(network: nn.Module, group_data: torch.Tensor, foreground: Callable, chunk_size: int,
                  tiles: Optional[torch.Tensor] = None, source: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The network's lesion prediction (G*N, 1, *patch) bool of the group sub-volumes, without gradient.

    group_data: (G*N, C, *patch); foreground: softmax logits (B, K, *patch) -> bool (B, 1, *patch);
    tiles: (T,) long, the tiles to predict, in chunks of `chunk_size` (None: all); the others stay empty;
    source: (G*N,) long, the tile whose prediction each tile takes (`group_source`). Call it inside the
    caller's autocast. No host synchronisation: the indices live on the host.
    """
    n = group_data.shape[0]
    if tiles is None:
        tiles = torch.arange(n)
    pred_fg = torch.zeros((n, 1, *group_data.shape[2:]), dtype=torch.bool, device=group_data.device)
    if len(tiles):
        tiles = tiles.to(group_data.device)
        chunks = []
        for chunk in torch.split(group_data[tiles], max(1, chunk_size)):
            out = network(chunk)
            chunks.append(foreground(out[0] if isinstance(out, list) else out))
        pred_fg[tiles] = torch.cat(chunks)
    if source is not None:
        pred_fg = pred_fg[source.to(group_data.device)]
    return pred_fg
