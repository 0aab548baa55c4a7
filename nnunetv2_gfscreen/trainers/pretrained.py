"""`-pretrained_weights` for GF-Screen: weights of a plain nnU-Net checkpoint go into the Focus.

nnU-Net's `load_pretrained_weights(network, fname)` (nnunetv2/run/load_pretrained_weights.py) asserts that
every key of the network is in the file, so a dense nnU-Net checkpoint (keys `encoder.*`, `decoder.*`) cannot
initialise a `GFScreenNetwork` (keys `focus.*`, `glance.*`, `threshold`). nnU-Net offers no hook for this:
`run_training.maybe_load_checkpoint` calls the module-level function directly. So GFScreenTrainer, when it is
constructed, points that one name at `load_pretrained_weights_gfscreen` (nnunet_adapters.use_pretrained_weights_loader):
for a GFScreenNetwork the file's weights go into the
Focus (nnU-Net's own function applied to the Focus submodule, same rules: seg layers skipped, shapes
checked), the Glance keeps its fresh initialisation; every other network goes to nnU-Net's function
unchanged. A GF-Screen checkpoint (`focus.*` keys) is loaded the nnU-Net way, into the whole module.

A network with `pretrained_focus_strict = True` (the retrofit trainer sets it) takes the Focus strictly,
segmentation layers included, and remembers the source's test-time mirroring axes (`pretrained_focus`):
the retrofit must reproduce the source model's output exactly.
"""
import hashlib
from typing import Mapping

import torch
from torch import nn

from nnunetv2.run.load_pretrained_weights import load_pretrained_weights as nnunet_load_pretrained_weights

from nnunetv2_gfscreen.core.network import GFScreenNetwork, PretrainedFocus, unwrap_module

FOCUS_PREFIX = "focus."


def is_gfscreen_state_dict(weights: Mapping[str, torch.Tensor]) -> bool:
    """Whether a checkpoint's `network_weights` come from a GF-Screen model (Focus under `focus.`)."""
    return any(k.startswith(FOCUS_PREFIX) for k in weights) and any(k.startswith("glance.") for k in weights)


def focus_state_dict(weights: Mapping[str, torch.Tensor]) -> dict:
    """The Focus's weights with plain nnU-Net key names, from a plain or a GF-Screen `network_weights`."""
    if is_gfscreen_state_dict(weights):
        return {k[len(FOCUS_PREFIX):]: v for k, v in weights.items() if k.startswith(FOCUS_PREFIX)}
    return dict(weights)


def load_focus_strict(network: GFScreenNetwork, weights: Mapping[str, torch.Tensor], source: str = "") -> None:
    """Copy a trained model's weights into the Focus exactly (every key, segmentation layers included).

    Raises ValueError naming the first differing keys when the architectures differ (the plans do not match)."""
    focus_weights = focus_state_dict(weights)
    own = network.focus.state_dict()
    missing, unexpected = sorted(set(own) - set(focus_weights)), sorted(set(focus_weights) - set(own))
    shapes = [k for k in own if k in focus_weights and own[k].shape != focus_weights[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"the checkpoint {source} does not fit the Focus that the plans describe (different plans or "
                         f"network?): missing {missing[:3]}, unexpected {unexpected[:3]}, other shape {shapes[:3]}")
    network.focus.load_state_dict(focus_weights, strict=True)


def focus_fingerprint(focus: nn.Module) -> str:
    """sha256 of the Focus's weights (names, dtypes, shapes, bytes): identifies the model a cache came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(focus.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def load_pretrained_weights_gfscreen(network: nn.Module, fname: str, verbose: bool = False) -> None:
    """nnU-Net's `load_pretrained_weights`, made to accept plain nnU-Net checkpoints for a GFScreenNetwork."""
    mod = unwrap_module(network)
    if not isinstance(mod, GFScreenNetwork):
        return nnunet_load_pretrained_weights(network, fname, verbose)
    checkpoint = torch.load(fname, map_location="cpu", weights_only=False)
    weights = checkpoint["network_weights"]
    if mod.pretrained_focus_strict:
        load_focus_strict(mod, weights, fname)
        # the source model's test-time mirroring, so that predictions with every tile selected stay identical
        mirroring = checkpoint.get("inference_allowed_mirroring_axes")
        mod.pretrained_focus = PretrainedFocus(fname, None if mirroring is None else tuple(mirroring))
        print(f"GF-Screen: Focus loaded from {fname} (all keys, segmentation layers included)")
    elif is_gfscreen_state_dict(weights):
        nnunet_load_pretrained_weights(mod, fname, verbose)
    else:
        nnunet_load_pretrained_weights(mod.focus, fname, verbose)
        print(f"GF-Screen: Focus initialised from the nnU-Net checkpoint {fname}; the Glance starts fresh")
    if mod.pretrained_focus is None:
        mod.pretrained_focus = PretrainedFocus(fname)
