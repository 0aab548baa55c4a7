"""GFScreenNetwork: the Focus and the Glance in the one module that nnU-Net builds and checkpoints.

nnU-Net's predictor only knows `build_network_architecture` and `network_weights`, so everything
inference needs (Glance weights, the calibrated gate threshold) lives here as parameters and
buffers. In eval mode the module gates itself: the Glance scores each input tile and rejected
tiles get all-zero logits, which nnU-Net's Gaussian blending treats as an abstention (see
docs/nnunet_internals.md, section 5), so the stock `nnUNetv2_predict` is gated with no other change.

One decision per tile: nnU-Net's mirroring TTA hands the network each flipped copy of a tile
separately, so the Glance's select logit is averaged over the flips of `glance_mirror_axes` (the axes
the model mirrors at inference); every flipped copy then gets the same decision, and every path
(stock predictor, GFScreenPredictor, calibration) scores through `glance_logits`.

torch.compile: nnU-Net compiles the whole module. The data-dependent part (which tiles, how many,
the counters) runs in `_focus_on_selected`, which Dynamo skips without skipping what it calls, so
the Glance and the Focus stay compiled and nothing recompiles per call.
"""
import itertools
from contextlib import contextmanager, nullcontext
from typing import Iterator, List, Sequence, Tuple

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


SPATIAL_DIMS = 3  # the Glance is a 3D network
MIRROR_AXES_BUFFER = "glance_mirror_axes"


def _mirror_mask(axes: Sequence[int]) -> torch.Tensor:
    axes = [int(a) for a in (axes or ())]
    if any(not 0 <= a < SPATIAL_DIMS for a in axes):
        raise ValueError(f"Glance mirror axes must be spatial axes in [0, {SPATIAL_DIMS - 1}], got {axes}")
    return torch.tensor([a in axes for a in range(SPATIAL_DIMS)], dtype=torch.bool)


class GFScreenNetwork(nn.Module):
    def __init__(self, focus: nn.Module, glance: nn.Module, num_classes: int, threshold: float = 0.5,
                 glance_mirror_axes: Sequence[int] = ()):
        super().__init__()
        self.focus = focus
        self.glance = glance
        self.num_classes = num_classes
        # saved with the weights so that both predictors find the calibrated value
        self.register_buffer("threshold", torch.tensor(float(threshold), dtype=torch.float64))
        # saved with the weights: the spatial axes whose flips the Glance's logit is averaged over (a bool mask);
        # checkpoints written before it existed load as "no axes" (see _load_from_state_dict)
        self.register_buffer(MIRROR_AXES_BUFFER, _mirror_mask(glance_mirror_axes))
        self._flip_dims = self._flips_of(self.glance_mirror_axes)  # a constant for Dynamo, not a tensor read
        self.gating_enabled = True
        # counters (not saved) so callers and tests can see how many tiles the gate skipped; only
        # `_focus_on_selected`, which Dynamo does not trace, touches them
        self.tiles_scored = 0
        self.tiles_selected = 0

    # ------------------------------------------------------------------ mirror-invariant Glance score
    @staticmethod
    def _flips_of(mask: torch.Tensor) -> List[Tuple[int, ...]]:
        axes = [i + 2 for i, m in enumerate(mask.tolist()) if m]  # tensor dims of (B, C, z, y, x)
        return [c for k in range(len(axes) + 1) for c in itertools.combinations(axes, k)]

    def set_glance_mirror_axes(self, axes: Sequence[int] | None) -> None:
        """Average the Glance over the flips of these spatial axes (nnU-Net's `inference_allowed_mirroring_axes`)."""
        self.glance_mirror_axes.copy_(_mirror_mask(axes or ()))
        self._flip_dims = self._flips_of(self.glance_mirror_axes)

    @property
    def glance_mirror_axes_tuple(self) -> Tuple[int, ...]:
        return tuple(i for i, m in enumerate(self.glance_mirror_axes.tolist()) if m)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Checkpoints without the mirror-axes buffer (written before it existed, e.g. the shipped demo model)
        load strictly as "no averaging", so they score exactly as they were calibrated."""
        key = prefix + MIRROR_AXES_BUFFER
        if key not in state_dict:
            state_dict[key] = torch.zeros(SPATIAL_DIMS, dtype=torch.bool)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._flip_dims = self._flips_of(self.glance_mirror_axes)

    @property
    def decoder(self) -> nn.Module:
        """nnU-Net's `set_deep_supervision_enabled` reaches into `network.decoder`."""
        return self.focus.decoder

    def glance_state(self) -> dict:
        """A copy of what defines the Glance's scores (its weights and mirror axes), in `state_dict` keys."""
        state = {f"glance.{k}": v.detach().clone() for k, v in self.glance.state_dict().items()}
        state[MIRROR_AXES_BUFFER] = self.glance_mirror_axes.detach().clone()
        return state

    def load_glance_state(self, state_dict: dict) -> None:
        """Load only the Glance part of a full `state_dict` (one fold's weights), strictly; no mirror-axes entry
        means no averaging, as in `_load_from_state_dict`."""
        self.glance.load_state_dict({k[len("glance."):]: v for k, v in state_dict.items() if k.startswith("glance.")},
                                    strict=True)
        mask = state_dict.get(MIRROR_AXES_BUFFER)
        self.set_glance_mirror_axes(() if mask is None else [i for i, m in enumerate(mask.tolist()) if m])

    def glance_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The select logit of a batch of tiles x (B, C, *patch) -> (B,) float64, averaged over the flips of
        `glance_mirror_axes` (one Glance pass when there are none).

        The flips form a group, so a flipped copy of a tile has the same set of flipped views; the logits are
        sorted before the mean so that the sum runs in the same order too, and the result is bitwise the same.
        """
        if len(self._flip_dims) == 1:
            return self.glance(x).double()
        logits = torch.stack([self.glance(torch.flip(x, dims) if dims else x).double() for dims in self._flip_dims])
        return logits.sort(dim=0).values.mean(dim=0)

    def glance_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """p(select | tile) for a batch of tiles x (B, C, *patch) -> (B,) float64 (sigmoid of `glance_logits`).

        float64 because a trained Glance is confident: float32 rounds p to exactly 1 from logit ~16.6 on,
        and calibrated thresholds sit there (logits of 20-40 are common on tiles that hold a lesion in their
        middle); float64 resolves p up to logit ~36."""
        return torch.sigmoid(self.glance_logits(x))

    def is_gating(self) -> bool:
        deep_supervision = getattr(getattr(self.focus, "decoder", None), "deep_supervision", False)
        return (not self.training) and self.gating_enabled and not deep_supervision

    def forward(self, x: torch.Tensor):
        if not self.is_gating():
            return self.focus(x)
        return self.gated_forward(x)

    def gated_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Focus logits for selected tiles, zeros (abstention) for the rest. x: (B, C, *patch)."""
        return self._focus_on_selected(x, self.glance_probabilities(x))

    @torch.compiler.disable(recursive=False)
    def _focus_on_selected(self, x: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
        """The data-dependent half of the gate: select, count, run the Focus on the selected tiles only.

        Dynamo skips this frame (its Python-int counters and the sub-batch size would otherwise become guards
        that fail on every call) but still compiles the frames it calls, so a compiled network keeps its Focus
        compiled (one graph per sub-batch size, then one dynamic graph).
        """
        selected = select_tiles(probabilities, self.threshold)
        n_selected = int(selected.sum())
        self.tiles_scored += int(selected.numel())
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
