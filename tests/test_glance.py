import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nnunetv2_gfscreen.core.glance import GlanceNet, build_glance, glance_strides, scaled_shape
from nnunetv2_gfscreen.core.grl import detection_reward, grl_loss

CT_TILE = (48, 224, 192)          # nnU-Net 3d_fullres patch for abdominal CT at 2.5 x 0.78 x 0.78 mm
CT_SPACING = (2.5, 0.78, 0.78)


def _small_glance(patch_size=(16, 32, 32), input_scale=0.5) -> GlanceNet:
    return GlanceNet(1, input_scale=input_scale, features_per_stage=(4, 8, 16), blocks_per_stage=1,
                     patch_size=patch_size)


def test_strides_follow_anisotropy_and_min_size():
    # z is less than half of y: stride in-plane only until it is not, never below 4 voxels
    assert glance_strides((24, 112, 96), 5) == [(1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 1, 1)]
    assert glance_strides((8, 8, 8), 3) == [(2, 2, 2), (1, 1, 1), (1, 1, 1)]
    assert scaled_shape(CT_TILE, 0.5) == (24, 112, 96)
    assert scaled_shape(CT_TILE, (1.0, 0.5, 0.25)) == (48, 112, 48)
    assert build_glance(1, CT_TILE).strides == glance_strides((24, 112, 96), 5)


@pytest.mark.parametrize('tile', [(16, 32, 32), (32, 64, 64), (40, 96, 80), (5, 7, 9)])
@pytest.mark.parametrize('batch', [1, 3])
def test_output_shape_any_tile(tile, batch):
    net = _small_glance()
    out = net(torch.randn(batch, 1, *tile))
    assert out.shape == (batch,)
    shape = net.internal_shape(tile)
    assert all(s % t == 0 and s >= 2 * t for s, t in zip(shape, net.total_stride))


def test_default_glance_on_a_ct_tile_gives_one_logit_per_tile():
    with torch.device('meta'):          # shapes only: the real forward is checked by the FLOP test
        net = build_glance(2, CT_TILE)
        assert net(torch.empty(1, 2, *CT_TILE)).shape == (1,)
    assert net.internal_shape(CT_TILE) == (24, 112, 96)


def test_train_and_eval_give_identical_outputs_and_start_near_half():
    torch.manual_seed(0)
    net = _small_glance()
    x = torch.randn(4, 1, 16, 32, 32)
    with torch.no_grad():
        train_out = net.train()(x)
        eval_out = net.eval()(x)
    assert torch.equal(train_out, eval_out)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert (torch.sigmoid(eval_out) - 0.5).abs().max() < 0.05
    assert net.head.bias.item() == 0.0


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match='BatchNorm3d'):
        GlanceNet(1, norm_op=nn.BatchNorm3d)
    with pytest.raises(ValueError, match='input_scale'):
        GlanceNet(1, input_scale=1.5)
    with pytest.raises(ValueError, match='blocks_per_stage'):
        GlanceNet(1, features_per_stage=(4, 8), blocks_per_stage=(1, 1, 1))
    with pytest.raises(ValueError, match=r'\(2, 1, 16, 16\)'):
        _small_glance()(torch.zeros(2, 1, 16, 16))


def _focus_unet() -> nn.Module:
    """nnU-Net's default 3d_fullres PlainConvUNet for the CT tile, topology from nnU-Net's planner."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
    _, strides, kernels, patch, _ = get_pool_and_conv_props(CT_SPACING, CT_TILE, 4, 999999)
    assert tuple(patch) == CT_TILE
    n = len(strides)
    return PlainConvUNet(1, n, [min(320, 32 * 2 ** i) for i in range(n)], nn.Conv3d, kernels, strides, 2, 2,
                         [2] * (n - 1), True, nn.InstanceNorm3d, {'eps': 1e-5, 'affine': True}, None, None,
                         nn.LeakyReLU, {'inplace': True}, deep_supervision=False)


def _flops(net: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        net(x)
    return counter.get_total_flops()


def test_glance_costs_at_most_five_percent_of_focus():
    with torch.device('meta'):          # FLOPs of convolutions depend on shapes only
        x = torch.empty(1, 1, *CT_TILE)
        focus_flops = _flops(_focus_unet(), x)
        glance_flops = _flops(build_glance(1, CT_TILE), x)
    assert focus_flops > 5e11            # sanity: the 3d_fullres U-Net is about 1.1 TFLOP per tile
    assert glance_flops / focus_flops <= 0.05


def _toy_ct(n_groups: int, group_size: int, generator: torch.Generator):
    """Tiles 1x16x32x32 of noise; 1-3 tiles per group hold a bright ball of radius 3 (the lesion)."""
    x = torch.randn(n_groups * group_size, 1, 16, 32, 32, generator=generator)
    gt = torch.zeros(n_groups * group_size, 16, 32, 32, dtype=torch.bool)
    zz, yy, xx = torch.meshgrid(torch.arange(16), torch.arange(32), torch.arange(32), indexing='ij')
    for g in range(n_groups):
        n_lesion = int(torch.randint(1, 4, (1,), generator=generator))
        for i in torch.randperm(group_size, generator=generator)[:n_lesion].tolist():
            c = [int(torch.randint(4, s - 4, (1,), generator=generator)) for s in (16, 32, 32)]
            ball = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= 9
            gt[g * group_size + i] = ball
            x[g * group_size + i, 0][ball] += 2.5
    group_ids = torch.arange(n_groups).repeat_interleave(group_size)
    return x, gt, group_ids


def test_glance_learns_to_select_lesion_tiles_from_grl_alone(one_torch_thread):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    group_size, groups_per_step = 8, 2
    x_train, gt_train, ids_train = _toy_ct(32, group_size, gen)
    x_test, gt_test, _ = _toy_ct(16, group_size, gen)
    labels_test = gt_test.flatten(1).any(1)

    net = _small_glance()
    ref = copy.deepcopy(net).requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(100):
        if step % 5 == 0:
            ref.load_state_dict(net.state_dict())         # refresh the reference policy
        groups = torch.randperm(32, generator=gen)[:groups_per_step]
        idx = (groups[:, None] * group_size + torch.arange(group_size)).flatten()
        x, gt = x_train[idx], gt_train[idx]
        rewards = detection_reward(gt, gt)                # a perfect Focus: reward = the tile holds a lesion
        with torch.no_grad():
            ref_logits = ref(x)
        terms = grl_loss(net(x), ref_logits, rewards, rewards, ids_train[idx], alpha=0.0)
        optimizer.zero_grad()
        terms.total.backward()
        optimizer.step()

    with torch.no_grad():
        selected = torch.sigmoid(net.eval()(x_test)) > 0.5
    accuracy = (selected == labels_test).float().mean().item()
    assert accuracy >= 0.9, f"tile accuracy {accuracy:.3f}"
