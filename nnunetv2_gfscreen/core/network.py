"""GFScreenNetwork: the Focus and the Glance in the one module that nnU-Net builds and checkpoints.

nnU-Net's predictor only knows `build_network_architecture` and `network_weights`, so everything
inference needs (Glance weights, the calibrated gate rule) lives here as parameters and buffers
(`gate`, core/gate.py). In eval mode the module gates itself: the Glance scores each input tile and
rejected tiles get all-zero logits, which nnU-Net's Gaussian blending treats as an abstention (see
docs/nnunet_internals.md, section 5), so the stock `nnUNetv2_predict` is gated with no other change.
There it applies the gate's per-tile part, the threshold (it sees one tile at a time, never the case).

One score per tile, one Glance pass: `glance_logits` is what every path calls (both predictors,
calibration, the trainer's validation). nnU-Net's mirroring TTA hands the network each flipped copy of
a tile right after the tile itself (`_internal_maybe_mirror_and_predict`); the network recognises a
flipped copy of the tile it just scored and reuses that decision (`_MirroredCopies`), so every copy gets
the same decision and the Glance runs once per tile, not 2^k times.

torch.compile: nnU-Net compiles the whole module. The data-dependent part (recognising copies, which
tiles, how many) runs in `_decide_tiles` and `_focus_on_selected`, which Dynamo skips without skipping
what they call, so the Glance and the Focus stay compiled and nothing recompiles per call.
"""
import itertools
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch
from torch import nn

from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel

from nnunetv2_gfscreen.core.gate import Gate, GateRule, select_tiles

SPATIAL_DIMS = 3  # the Glance is a 3D network
# every flip nnU-Net's TTA can apply to a (B, C, z, y, x) tile, in the order it applies them
_FLIPS = [c for k in range(1, SPATIAL_DIMS + 1) for c in itertools.combinations(range(2, 2 + SPATIAL_DIMS), k)]


class _MirroredCopies:
    """Remembers the last tile batch the gate scored and its decision; a later call with a flipped copy of it
    (what nnU-Net's TTA sends next) gets the same decision without a Glance pass. A tensor comparison is
    exact and costs far less than the Glance. Anything else is scored on its own."""

    def __init__(self):
        self.tiles: Optional[torch.Tensor] = None
        self.selected: Optional[torch.Tensor] = None
        self.threshold: Optional[torch.Tensor] = None
        self._next = 0  # the flip to try first: nnU-Net sends them in order

    def clear(self) -> None:
        self.tiles = self.selected = self.threshold = None

    def lookup(self, x: torch.Tensor, threshold: torch.Tensor) -> Optional[torch.Tensor]:
        if self.tiles is None or x.shape != self.tiles.shape or x.dtype != self.tiles.dtype \
                or x.device != self.tiles.device or x.ndim != 2 + SPATIAL_DIMS \
                or not torch.equal(threshold, self.threshold):
            return None
        for i in range(len(_FLIPS)):
            j = (self._next + i) % len(_FLIPS)
            if torch.equal(torch.flip(x, _FLIPS[j]), self.tiles):
                self._next = (j + 1) % len(_FLIPS)
                return self.selected
        return None

    def remember(self, x: torch.Tensor, selected: torch.Tensor, threshold: torch.Tensor) -> None:
        self.tiles, self.selected, self.threshold, self._next = x, selected, threshold.clone(), 0


@dataclass
class PretrainedFocus:
    """Where the Focus's weights came from: a checkpoint file (or "resumed checkpoint") and the test-time mirroring
    axes of that model."""
    file: str
    mirroring_axes: Optional[Tuple[int, ...]] = None


class GFScreenNetwork(nn.Module):
    def __init__(self, focus: nn.Module, glance: nn.Module, num_classes: int, rule: GateRule = GateRule()):
        super().__init__()
        self.focus = focus
        self.glance = glance
        self.num_classes = num_classes
        self.gate = Gate(rule)  # saved with the weights, so both predictors find the calibrated rule
        self.gating_enabled = True
        self._copies = _MirroredCopies()
        # set when the Focus's weights were loaded from a trained model (-pretrained_weights, trainers/pretrained.py;
        # not saved): the source file and its test-time mirroring axes; and whether that load must take every Focus
        # key (the retrofit reproduces the source model exactly)
        self.pretrained_focus: Optional[PretrainedFocus] = None
        self.pretrained_focus_strict = False

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nnU-Net loads each fold's weights before its sliding window: a new fold forgets the last decision."""
        self._copies.clear()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def decoder(self) -> nn.Module:
        """nnU-Net's `set_deep_supervision_enabled` reaches into `network.decoder`."""
        return self.focus.decoder

    def glance_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The score of every path: the Glance's select logit of a batch of tiles x (B, C, *patch) -> (B,) float64.

        float64 because a trained Glance is confident and calibrated thresholds sit far out in the tail."""
        return self.glance(x).double()

    def is_gating(self) -> bool:
        deep_supervision = getattr(getattr(self.focus, "decoder", None), "deep_supervision", False)
        return (not self.training) and self.gating_enabled and not deep_supervision

    def forward(self, x: torch.Tensor):
        if not self.is_gating():
            self._copies.clear()
            return self.focus(x)
        return self._focus_on_selected(x, self._decide_tiles(x))

    @torch.compiler.disable(recursive=False)
    def _decide_tiles(self, x: torch.Tensor) -> torch.Tensor:
        """The threshold part of the gate for a batch of tiles (B,) bool; a flipped copy of the last batch gets
        its decision (module docstring)."""
        threshold = self.gate.threshold
        selected = self._copies.lookup(x, threshold)
        if selected is None:
            selected = select_tiles(self.glance_logits(x), threshold)
            self._copies.remember(x, selected, threshold)
        return selected

    @torch.compiler.disable(recursive=False)
    def _focus_on_selected(self, x: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """Focus logits for the selected tiles, zeros (abstention) for the rest. Dynamo skips this frame (the
        sub-batch size would otherwise become a guard that fails on every call) but still compiles the Focus it
        calls (one graph per sub-batch size, then one dynamic graph)."""
        n_selected = int(selected.sum())
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


def unwrap_module(network: torch.nn.Module) -> torch.nn.Module:
    """The module behind DDP and torch.compile wrappers (the module itself when unwrapped)."""
    network = network.module if isinstance(network, DistributedDataParallel) else network
    return network._orig_mod if isinstance(network, OptimizedModule) else network


def unwrap_gfscreen_network(network: torch.nn.Module) -> GFScreenNetwork:
    """The GFScreenNetwork behind a (possibly DDP-wrapped, torch.compile'd) module; TypeError for anything else."""
    net = unwrap_module(network)
    if not isinstance(net, GFScreenNetwork):
        raise TypeError(f"GF-Screen gating needs a GFScreenNetwork (a model trained with GFScreenTrainer or a "
                        f"variant), got {type(net).__name__}")
    return net


def autocast_on_cuda(device: torch.device):
    """nnU-Net's mixed-precision rule: autocast on CUDA, full precision elsewhere."""
    return torch.autocast(device.type, enabled=True) if device.type == "cuda" else nullcontext()
