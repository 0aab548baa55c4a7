"""Multi-GPU (DDP) training for GFScreenTrainer: `nnUNetv2_train ... -num_gpus N`.

nnU-Net wraps its whole network in one DDP wrapper. GF-Screen trains two networks with two optimisers:
the Focus (inside the network nnU-Net checkpoints) and the policy Glance (outside it; the network's
own Glance is an EMA of the policy and takes no gradient). So:

- the network gets its DDP wrapper as in nnU-Net, but only the Focus requires gradients inside it
  (the EMA Glance is frozen), so DDP registers no unused Glance parameters; `broadcast_buffers` is
  off, because the network's buffers (the gate threshold) are set per case in the final validation,
  where the ranks predict different cases with different tile counts (a per-forward broadcast would
  both overwrite the threshold and deadlock);
- the policy Glance gets its own DDP wrapper, through which its forward runs (`policy_forward`),
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

from nnunetv2_gfscreen.nnunet_adapters import per_rank_batch_and_loss


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


class GFScreenDDPMixin:
    """DDP for GFScreenTrainer; place before nnUNetTrainer in the bases. Without a process group it does nothing."""

    def _keep_cpu_under_gloo(self, device: torch.device) -> None:
        """nnU-Net moves every DDP rank to cuda:rank; a CPU run under gloo (tests) stays on the CPU, without AMP."""
        if self.is_ddp and device.type == "cpu" and dist.get_backend() == "gloo":
            self.device = device
            self.grad_scaler = None

    def initialize(self):
        """nnU-Net's single-process initialisation, then the per-rank batch size, the DDP loss and the two wrappers.

        nnU-Net would wrap the network itself; it is done here so that the Glance gets its own wrapper with the
        same settings and the CPU (gloo) path is the CUDA path without device ids."""
        ddp, self.is_ddp = self.is_ddp, False
        try:
            super().initialize()
        finally:
            self.is_ddp = ddp
        self._policy_wrapper = self.policy_glance
        if not ddp:
            return
        per_rank_batch_and_loss(self)  # nnU-Net's per-rank share of the Focus batch, Dice gathered across ranks
        self.network = _ddp(nn.SyncBatchNorm.convert_sync_batchnorm(self.network), self.device)
        self._policy_wrapper = _ddp(_DenseForward(self.policy_glance), self.device)
        self.print_to_log_file(f"DDP rank {self.local_rank}/{dist.get_world_size()}: Focus batch {self.batch_size}, "
                               f"{self.gfscreen.groups_per_step} GRL groups per rank and step")

    def policy_forward(self, x: torch.Tensor):
        """(select logits, dense logits) of the policy Glance, through its DDP wrapper when there is one."""
        wrapper = getattr(self, "_policy_wrapper", None)
        if wrapper is None or wrapper is self.policy_glance:
            return self.policy_glance.forward_dense(x)
        return wrapper(x)

    def local_network(self) -> nn.Module:
        """The network without its DDP wrapper (still compiled if it was): for forwards that take no gradient and
        that ranks may run a different number of times."""
        return self.network.module if isinstance(self.network, DDP) else self.network

    def gather_values(self, values: Sequence[Any]) -> np.ndarray:
        """All ranks' values concatenated (this rank's alone without DDP)."""
        values = np.asarray(values)
        if not self.is_ddp:
            return values
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, values)
        return np.concatenate([np.atleast_1d(g) for g in gathered])

    def gather_lists(self, items: List[Any]) -> List[Any]:
        """All ranks' list items, rank by rank (this rank's alone without DDP)."""
        if not self.is_ddp:
            return list(items)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, list(items))
        return [x for part in gathered for x in part]

    def gather_sum(self, counts: np.ndarray) -> np.ndarray:
        """Element-wise sum of an array over all ranks."""
        counts = np.asarray(counts)
        if not self.is_ddp:
            return counts
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, counts)
        return np.sum(gathered, axis=0)

    def broadcast_from_rank0(self, obj: Any) -> Any:
        """Rank 0's object on every rank (e.g. the calibration result)."""
        if not self.is_ddp:
            return obj
        box = [obj if self.local_rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]
