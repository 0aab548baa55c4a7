"""The Glance: a cheap 3D classifier that scores p(select | tile) for every sliding-window tile.

It sees each Focus tile at reduced resolution (``input_scale``), runs a light residual encoder
from dynamic-network-architectures (``ResidualEncoder`` with ``BasicBlockD``, i.e. ResNet-D blocks),
averages the last feature map and maps it to one logit. Its cost is meant to stay below 5% of the
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

    Head: global mean and max pooling, concatenated, then a Linear (see __init__ for why the max).

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
                 min_feature_map_size: int = 4):
        super().__init__()
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

        self.encoder = ResidualEncoder(
            in_channels, n_stages, list(features_per_stage), nn.Conv3d, kernel_size, strides,
            list(blocks_per_stage), conv_bias=False, norm_op=norm_op, norm_op_kwargs=norm_op_kwargs,
            nonlin=nonlin, nonlin_kwargs=nonlin_kwargs, block=BasicBlockD, return_skips=False)
        # mean and max over space: after instance normalisation a channel's spatial mean is just its
        # affine bias, so average pooling alone discards most of the input; the max keeps "a strong
        # local response somewhere in the tile", which is what a small lesion produces
        self.head = nn.Linear(2 * features_per_stage[-1], 1)
        self.encoder.apply(InitWeights_He(1e-2))
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def internal_shape(self, tile_shape: Sequence[int]) -> Tuple[int, int, int]:
        """Spatial shape the encoder sees for a tile of ``tile_shape``: ~``input_scale`` times it,
        a multiple of the total stride per axis and at least twice the total stride."""
        target = scaled_shape(tile_shape, self.input_scale)
        return tuple(max(2, round(t / s)) * s for t, s in zip(target, self.total_stride))

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, D, H, W) -> select logits (B,)."""
        if x.ndim != 5:
            raise ValueError(f"GlanceNet expects (B, C, D, H, W), got shape {tuple(x.shape)}")
        shape = self.internal_shape(x.shape[2:])
        if tuple(x.shape[2:]) != shape:
            x = F.adaptive_avg_pool3d(x, shape)
        x = self.encoder(x).flatten(2)
        return self.head(torch.cat([x.mean(2), x.amax(2)], dim=1))[:, 0]


def build_glance(in_channels: int, patch_size: Sequence[int],
                 input_scale: Union[float, Sequence[float]] = 0.5) -> GlanceNet:
    """The default Glance for Focus tiles of ``patch_size`` (z, y, x).

    Five ResNet-D stages (16-256 features, 2 blocks each, the ResNet-18 layout) on the tile at half
    resolution, strides from ``glance_strides``. For nnU-Net's default 48x224x192 CT tile this
    costs about 1% of the 3d_fullres PlainConvUNet's FLOPs (see tests/test_glance.py).
    """
    return GlanceNet(in_channels, input_scale=input_scale, patch_size=patch_size)
