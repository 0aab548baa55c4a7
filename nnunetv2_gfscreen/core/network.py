"""GFScreenNetwork: the Focus and the Glance in the one module that nnU-Net builds and checkpoints.

nnU-Net's predictor only knows `build_network_architecture` and `network_weights`, so everything
inference needs (Glance weights, the calibrated gate threshold) lives here as parameters and
buffers. In eval mode the module gates itself: the Glance scores each input tile and rejected
tiles get all-zero logits, which nnU-Net's Gaussian blending treats as an abstention (see
NNUNET_NOTES.md), so the stock `nnUNetv2_predict` is gated with no other change.
"""
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel


def select_tiles(probabilities: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """Tiles whose Glance probability p(select) exceeds `threshold` go to the Focus.

    probabilities: (B,) in [0, 1]. Returns a bool mask (B,). A NaN score is never silently
    rejected (a NaN input would otherwise turn into "healthy"): it raises.
    """
    if probabilities.ndim != 1:
        raise ValueError(f"expected Glance probabilities of shape (B,), got {tuple(probabilities.shape)}")
    if torch.isnan(probabilities).any():
        raise ValueError("Glance produced NaN scores; is there NaN in the input image?")
    return probabilities > threshold


class GFScreenNetwork(nn.Module):
    def __init__(self, focus: nn.Module, glance: nn.Module, num_classes: int, threshold: float = 0.5):
        super().__init__()
        self.focus = focus
        self.glance = glance
        self.num_classes = num_classes
        # saved with the weights so that both predictors find the calibrated value
        self.register_buffer("threshold", torch.tensor(float(threshold), dtype=torch.float64))
        self.gating_enabled = True
        # counters (not saved) so callers and tests can see how many tiles the gate skipped
        self.tiles_scored = 0
        self.tiles_selected = 0

    @property
    def decoder(self) -> nn.Module:
        """nnU-Net's `set_deep_supervision_enabled` reaches into `network.decoder`."""
        return self.focus.decoder

    def glance_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """p(select | tile) for a batch of tiles x (B, C, *patch) -> (B,) float64.

        float64 because a trained Glance is confident: float32 rounds p to exactly 1 from logit ~16.6 on,
        and calibrated thresholds sit there (logits of 20-40 are common on tiles that hold a lesion in their middle); float64 resolves
        p up to logit ~36."""
        return torch.sigmoid(self.glance(x).double())

    def is_gating(self) -> bool:
        deep_supervision = getattr(getattr(self.focus, "decoder", None), "deep_supervision", False)
        return (not self.training) and self.gating_enabled and not deep_supervision

    def forward(self, x: torch.Tensor):
        if not self.is_gating():
            return self.focus(x)
        return self.gated_forward(x)

    def gated_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Focus logits for selected tiles, zeros (abstention) for the rest. x: (B, C, *patch)."""
        selected = select_tiles(self.glance_probabilities(x), self.threshold)
        self.tiles_scored += int(selected.numel())
        n_selected = int(selected.sum())
        self.tiles_selected += n_selected
        if n_selected == selected.numel():
            return self.focus(x)
        out = torch.zeros((x.shape[0], self.num_classes, *x.shape[2:]), device=x.device, dtype=x.dtype)
        if n_selected:
            focus_out = self.focus(x[selected])
            out = out.to(focus_out.dtype)
            out[selected] = focus_out
        return out

    @contextmanager
    def ungated(self) -> Iterator["GFScreenNetwork"]:
        """Run the Focus densely (e.g. for nnU-Net's online validation or a dense comparison)."""
        previous, self.gating_enabled = self.gating_enabled, False
        try:
            yield self
        finally:
            self.gating_enabled = previous


def unwrap_gfscreen_network(network: torch.nn.Module) -> GFScreenNetwork:
    """The GFScreenNetwork behind a (possibly DDP-wrapped, torch.compile'd) module; TypeError for anything else."""
    network = network.module if isinstance(network, DistributedDataParallel) else network
    net = network._orig_mod if isinstance(network, OptimizedModule) else network
    if not isinstance(net, GFScreenNetwork):
        raise TypeError(f"GF-Screen gating needs a GFScreenNetwork (a model trained with GFScreenTrainer or a "
                        f"variant), got {type(net).__name__}")
    return net
