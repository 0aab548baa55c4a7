"""The Glance: a cheap 3D classifier that scores p(select | tile) for every sliding-window tile.

It sees each Focus tile at reduced resolution (``input_scale``), runs a light residual encoder
from dynamic-network-architectures (``ResidualEncoder`` with ``BasicBlockD``, i.e. ResNet-D blocks)
and maps pooled features to one logit. A 1x1 convolution on an early stage also predicts a coarse
lesion map (the dense head): trained on the lesion mask, it gives every voxel of a training tile a
target instead of one bit per tile, and the maximum of that map over the tile's central region is
the feature a selection logit most needs ("a lesion sits in this tile, not only at its edge"). Its cost is meant to stay below 5% of the
Focus network per tile, so that scoring every tile is cheap next to segmenting the selected ones.
"""
import math
from typing import List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.residual import BasicBlockD
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import Tensor, nn

Stride = Union[int, Sequence[int]]


def _per_axis(value: Union[float, Sequence[float]], name: str) -> Tuple[float, float, float]:
    values = (value,) * 3 if isinstance(value, (int, float)) else tuple(value)
    if len(values) != 3:
        raise ValueError(f"{name} must be a number or 3 numbers (z, y, x), got {value!r}")
    return tuple(float(v) for v in values)


def scaled_shape(patch_size: Sequence[int], input_scale: Union[float, Sequence[float]]) -> Tuple[int, int, int]:
    """Tile shape after the Glance's internal downsampling: ``max(1, round(size * scale))`` per axis."""
    if len(patch_size) != 3:
        raise ValueError(f"patch_size must have 3 entries (z, y, x), got {patch_size!r}")
    scales = _per_axis(input_scale, 'input_scale')
    return tuple(max(1, round(s * f)) for s, f in zip(patch_size, scales))


def glance_strides(shape: Sequence[int], n_stages: int, min_feature_map_size: int = 4) -> List[Tuple[int, int, int]]:
    """Per-stage strides for a tile of ``shape`` (after downsampling), nnU-Net style.

    Stage by stage, an axis is strided by 2 only if (a) it stays at least ``min_feature_map_size``
    voxels long afterwards and (b) it is at least half as long as the longest axis. Rule (b) keeps
    anisotropic tiles from losing their short axis early: a 24x112x96 tile (48x224x192 at half
    resolution) is strided in-plane only for two stages, (1,2,2), (1,2,2), then isotropically.
    Stage 0 may stride too (the encoder's stem runs at full resolution), which is what keeps the
    Glance cheap.

    Returns:
        ``n_stages`` tuples of 3 ints in {1, 2}.
    """
    if n_stages < 1:
        raise ValueError(f"n_stages must be >= 1, got {n_stages}")
    if min_feature_map_size < 1:
        raise ValueError(f"min_feature_map_size must be >= 1, got {min_feature_map_size}")
    current = [int(s) for s in shape]
    strides = []
    for _ in range(n_stages):
        longest = max(current)
        stride = tuple(2 if (c // 2 >= min_feature_map_size and 2 * c >= longest) else 1 for c in current)
        current = [c // s for c, s in zip(current, stride)]
        strides.append(stride)
    return strides


class GlanceNet(nn.Module):
    """3D tile classifier returning select logits of shape (B,).

    forward(x): x is (B, C, D, H, W) at Focus tile resolution, any spatial size. The tile is
    average-pooled (``adaptive_avg_pool3d``: area averaging, which limits aliasing) to about
    ``input_scale`` times its size, rounded per axis to a multiple of the encoder's total stride
    (at least twice it), so that every residual block sees even sizes and the last feature map has
    at least 2 voxels per axis (instance normalisation needs more than one voxel).

    Normalisation is ``InstanceNorm3d(affine=True)`` by default: it uses no running statistics, so
    train and eval mode give the same output, which the GRL ratio against the frozen reference
    policy relies on. BatchNorm is refused for that reason.

    Strides: pass ``strides`` explicitly, or ``patch_size`` (the Focus tile shape) to derive them
    with ``glance_strides``; with neither, stage 0 strides in-plane only (1, 2, 2) and later stages
    isotropically (2, 2, 2), which suits typical CT tiles (z shorter than y, x).

    Head: global mean and max pooling of the last stage, concatenated with the maximum of the dense
    lesion map over the tile's central region (the middle half per axis) and over the whole tile, then
    a Linear (see __init__ for why the max). The dense head (``dense_stage``, a 1x1 convolution on that
    stage's output) is returned by ``forward_dense`` for its auxiliary loss; ``dense_stage=None``
    drops it. At tile step 0.5 the central regions of nnU-Net's tiles partition the volume's interior,
    so "lesion in my central region" marks the one tile per lesion part that holds it with margin.
    ``logit_bound`` c > 0 softly bounds the select logit to (-c, c) (c * tanh(z / c)), so that a score
    cannot run to +-40 where a shifted input moves a lesion from "sure" to "missed" with nothing between.

    Initialisation: He init for convolutions (as nnU-Net), the final Linear has weights
    N(0, 0.01^2) and bias 0, so the initial p(select) is about 0.5 for every tile.
    """

    def __init__(self,
                 in_channels: int,
                 input_scale: Union[float, Sequence[float]] = 0.5,
                 features_per_stage: Sequence[int] = (16, 32, 64, 128, 256),
                 blocks_per_stage: Union[int, Sequence[int]] = (2, 2, 2, 2, 2),
                 strides: Optional[Sequence[Stride]] = None,
                 patch_size: Optional[Sequence[int]] = None,
                 kernel_size: int = 3,
                 norm_op: Type[nn.Module] = nn.InstanceNorm3d,
                 norm_op_kwargs: Optional[dict] = None,
                 nonlin: Type[nn.Module] = nn.LeakyReLU,
                 nonlin_kwargs: Optional[dict] = None,
                 min_feature_map_size: int = 4,
                 dense_stage: Optional[int] = 1,
                 logit_bound: float = 0.0):
        super().__init__()
        if logit_bound < 0:
            raise ValueError(f"logit_bound must be >= 0 (0: unbounded), got {logit_bound}")
        self.logit_bound = float(logit_bound)
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        self.input_scale = _per_axis(input_scale, 'input_scale')
        if not all(0 < s <= 1 for s in self.input_scale):
            raise ValueError(f"input_scale must be in (0, 1] per axis, got {input_scale!r}")
        features_per_stage = tuple(int(f) for f in features_per_stage)
        n_stages = len(features_per_stage)
        if n_stages < 1 or min(features_per_stage) < 1:
            raise ValueError(f"features_per_stage must be positive ints, got {features_per_stage!r}")
        if isinstance(blocks_per_stage, int):
            blocks_per_stage = (blocks_per_stage,) * n_stages
        if len(blocks_per_stage) != n_stages:
            raise ValueError(f"blocks_per_stage must have {n_stages} entries (one per entry of features_per_stage), "
                             f"got {blocks_per_stage!r}")
        if issubclass(norm_op, nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"norm_op {norm_op.__name__} behaves differently in train and eval mode; "
                             f"use InstanceNorm3d or GroupNorm")
        if norm_op_kwargs is None:
            norm_op_kwargs = {'eps': 1e-5, 'affine': True}
        if issubclass(norm_op, nn.modules.instancenorm._InstanceNorm) and norm_op_kwargs.get('track_running_stats'):
            raise ValueError("InstanceNorm with track_running_stats=True behaves differently in train and eval mode")
        if nonlin_kwargs is None:
            nonlin_kwargs = {'inplace': True}

        if strides is None:
            if patch_size is not None:
                strides = glance_strides(scaled_shape(patch_size, self.input_scale), n_stages, min_feature_map_size)
            else:
                strides = [(1, 2, 2)] + [(2, 2, 2)] * (n_stages - 1)
        strides = [(s,) * 3 if isinstance(s, int) else tuple(int(i) for i in s) for s in strides]
        if len(strides) != n_stages or any(len(s) != 3 or min(s) < 1 for s in strides):
            raise ValueError(f"strides must hold {n_stages} entries of 1 or 3 positive ints, got {strides!r}")
        self.strides = strides
        self.total_stride = tuple(math.prod(s[a] for s in strides) for a in range(3))

        if dense_stage is not None and not 0 <= dense_stage < n_stages:
            raise ValueError(f"dense_stage must be None or a stage index in [0, {n_stages - 1}], got {dense_stage}")
        self.dense_stage = dense_stage
        self.encoder = ResidualEncoder(
            in_channels, n_stages, list(features_per_stage), nn.Conv3d, kernel_size, strides,
            list(blocks_per_stage), conv_bias=False, norm_op=norm_op, norm_op_kwargs=norm_op_kwargs,
            nonlin=nonlin, nonlin_kwargs=nonlin_kwargs, block=BasicBlockD, return_skips=True)
        self.dense_head = nn.Conv3d(features_per_stage[dense_stage], 1, 1) if dense_stage is not None else None
        # mean and max over space: after instance normalisation a channel's spatial mean is just its
        # affine bias, so average pooling alone discards most of the input; the max keeps "a strong
        # local response somewhere in the tile", which is what a small lesion produces
        n_dense = 2 if dense_stage is not None else 0
        self.head = nn.Linear(2 * features_per_stage[-1] + n_dense, 1)
        self.encoder.apply(InitWeights_He(1e-2))
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        if self.dense_head is not None:
            # the map starts near 0 so that p(select) starts at about 0.5; its central maximum enters the
            # logit with weight 1 (the map is trained as a lesion logit, so that is the natural scale)
            nn.init.normal_(self.dense_head.weight, std=0.01)
            nn.init.zeros_(self.dense_head.bias)
            with torch.no_grad():
                self.head.weight[0, -2] = 1.0

    def detach_select_logit_from_dense_map(self) -> None:
        """Start the select logit without the dense map: zero the head's weights on the map's maxima (for training
        without the dense map, where the map would otherwise be an untrained input weighted 1)."""
        if self.dense_head is not None:
            with torch.no_grad():
                self.head.weight[0, -2:] = 0.0

    def internal_shape(self, tile_shape: Sequence[int]) -> Tuple[int, int, int]:
        """Spatial shape the encoder sees for a tile of ``tile_shape``: ~``input_scale`` times it,
        a multiple of the total stride per axis and at least twice the total stride."""
        target = scaled_shape(tile_shape, self.input_scale)
        return tuple(max(2, round(t / s)) * s for t, s in zip(target, self.total_stride))

    def dense_shape(self, tile_shape: Sequence[int]) -> Optional[Tuple[int, int, int]]:
        """Spatial shape of the dense lesion map for a tile of ``tile_shape`` (None without a dense head): the
        internal shape divided by the strides of the stages up to ``dense_stage``."""
        if self.dense_head is None:
            return None
        stride = [math.prod(s[a] for s in self.strides[:self.dense_stage + 1]) for a in range(3)]
        return tuple(i // s for i, s in zip(self.internal_shape(tile_shape), stride))

    def forward_dense(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """x: (B, C, D, H, W) -> (select logits (B,), dense lesion logits (B, 1, d, h, w) or None)."""
        if x.ndim != 5:
            raise ValueError(f"GlanceNet expects (B, C, D, H, W), got shape {tuple(x.shape)}")
        shape = self.internal_shape(x.shape[2:])
        if tuple(x.shape[2:]) != shape:
            x = F.adaptive_avg_pool3d(x, shape)
        skips = self.encoder(x)
        last = skips[-1].flatten(2)
        features = [last.mean(2), last.amax(2)]
        dense = None
        if self.dense_head is not None:
            dense = self.dense_head(skips[self.dense_stage])
            centre = dense[(slice(None), slice(None)) + tuple(slice(s // 4, s - s // 4) for s in dense.shape[2:])]
            features += [centre.flatten(1).amax(1, keepdim=True), dense.flatten(1).amax(1, keepdim=True)]
        logits = self.head(torch.cat(features, dim=1))[:, 0]
        if self.logit_bound > 0:   # soft bound: monotonic, so the ranking of tiles is kept
            logits = self.logit_bound * torch.tanh(logits / self.logit_bound)
        return logits, dense

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, D, H, W) -> select logits (B,)."""
        return self.forward_dense(x)[0]


def build_glance(in_channels: int, patch_size: Sequence[int],
                 input_scale: Union[float, Sequence[float]] = 0.5, base_features: int = 16,
                 dense_stage: Optional[int] = 1, logit_bound: float = 0.0) -> GlanceNet:
    """The default Glance for Focus tiles of ``patch_size`` (z, y, x).

    Five ResNet-D stages (``base_features`` x 1, 2, 4, 8, 16 features, 2 blocks each: the ResNet-18
    layout at 16) on the tile at half resolution, strides from ``glance_strides``, the dense head on
    stage 1. For nnU-Net's default 48x224x192 CT tile this costs about 1% of the 3d_fullres
    PlainConvUNet's FLOPs (see tests/test_glance.py); narrower Glances suit CPU experiments.
    ``logit_bound`` c > 0 returns c * tanh(z / c) instead of the select logit z (0: z).
    """
    if base_features < 1:
        raise ValueError(f"base_features must be >= 1, got {base_features}")
    return GlanceNet(in_channels, input_scale=input_scale, patch_size=patch_size,
                     features_per_stage=tuple(base_features * 2 ** i for i in range(5)), dense_stage=dense_stage,
                     logit_bound=logit_bound)
