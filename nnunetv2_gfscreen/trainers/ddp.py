"""Multi-GPU (DDP) training for GFScreenTrainer: `nnUNetv2_train ... -num_gpus N`.

nnU-Net wraps its whole network in one DDP wrapper. GF-Screen trains two networks with two optimisers:
the Focus (inside the network nnU-Net checkpoints) and the policy Glance (outside it; the network's
own Glance is an EMA of the policy and takes no gradient). So:

- the network gets its DDP wrapper as in nnU-Net, but only the Focus requires gradients inside it
  (the EMA Glance is frozen), so DDP registers no unused Glance parameters; `broadcast_buffers` is
  off, because the network's buffers (the gate threshold) are set per case in the final validation,
  where the ranks predict different cases with different tile counts (a per-forward broadcast would
  both overwrite the threshold and deadlock);
- the policy Glance gets its own DDP wrapper, through which its forward runs (`wrap_networks`),
  so its gradients are all-reduced in the same backward as the Focus's;
- each rank draws its own `groups_per_step` groups (nnU-Net splits the Focus batch over the ranks;
  a group cannot be split: its advantages are relative within it), so a step sees N x as many groups;
- the GRL and Glance metrics are gathered from all ranks before they are logged;
- the gate is calibrated on rank 0 and its result broadcast, so every rank predicts its share of the
  final validation at the same leave-one-case-out thresholds.

nnU-Net's launcher uses NCCL on CUDA; the same code runs on the CPU under a gloo process group,
which is how the tests exercise it.
"""
import inspect
from typing import Any, List, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP



class _DenseForward(nn.Module):
    """Routes the Glance's `forward_dense` through `forward`, the only method a DDP wrapper hooks."""

    def __init__(self, glance: nn.Module):
        super().__init__()
        self.glance = glance

    def forward(self, x: torch.Tensor):
        return self.glance.forward_dense(x)


def _ddp(module: nn.Module, device: torch.device) -> DDP:
    # device_ids only for a CUDA module (DDP refuses them for a CPU one, e.g. under gloo)
    device_ids = [device.index if device.index is not None else 0] if device.type == "cuda" else None
    # no buffer broadcast per forward, still one at construction (torch >= 2.14 renames the switch)
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters \
        else {"broadcast_buffers": False}
    return DDP(module, device_ids=device_ids, **no_sync)


def ddp_active() -> bool:
    """Whether this process is one rank of a process group (nnU-Net's `is_ddp`)."""
    return dist.is_available() and dist.is_initialized()


def cpu_under_gloo(device: torch.device) -> bool:
    """nnU-Net moves every DDP rank to cuda:rank; a CPU run under a gloo group (the tests) stays on the CPU."""
    return ddp_active() and device.type == "cpu" and dist.get_backend() == "gloo"


def wrap_networks(network: nn.Module, policy_glance: nn.Module, device: torch.device):
    """(network, policy wrapper): the network (Focus + frozen EMA Glance) in nnU-Net's DDP wrapper, and the policy
    Glance in its own, whose `forward` returns `forward_dense`. nnU-Net would wrap the network itself; doing it
    here gives the Glance the same settings and makes the CPU (gloo) path the CUDA path without device ids."""
    return _ddp(nn.SyncBatchNorm.convert_sync_batchnorm(network), device), _ddp(_DenseForward(policy_glance), device)


def gather_values(values: Sequence[Any]) -> np.ndarray:
    """All ranks' values concatenated (this rank's alone without DDP)."""
    values = np.asarray(values)
    if not ddp_active():
        return values
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    return np.concatenate([np.atleast_1d(g) for g in gathered])


def gather_lists(items: List[Any]) -> List[Any]:
    """All ranks' list items, rank by rank (this rank's alone without DDP)."""
    if not ddp_active():
        return list(items)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(items))
    return [x for part in gathered for x in part]


def gather_sum(counts: np.ndarray) -> np.ndarray:
    """Element-wise sum of an array over all ranks."""
    counts = np.asarray(counts)
    if not ddp_active():
        return counts
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, counts)
    return np.sum(gathered, axis=0)


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's object on every rank (e.g. the calibration record)."""
    if not ddp_active():
        return obj
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
