"""The Glance's optimisation helpers (cosine LR, EMA, intensity augmentation, dense loss) and its dense head."""
import math

import pytest
import torch
from torch import nn

from nnunetv2_gfscreen.core.glance import GlanceNet, build_glance
from nnunetv2_gfscreen.trainers.glance_training import (cosine_lr, dense_lesion_loss, ema_decay, ema_update,
                                                        intensity_augmentation, lesion_map_weights)


def test_cosine_lr_by_hand():
    assert cosine_lr(1e-3, 0, 100) == pytest.approx(1e-3)
    assert cosine_lr(1e-3, 50, 100) == pytest.approx(0.5e-3)
    assert cosine_lr(1e-3, 25, 100) == pytest.approx(1e-3 * (1 + math.cos(math.pi / 4)) / 2)
    assert cosine_lr(1e-3, 100, 100) == pytest.approx(0.0)
    assert cosine_lr(1e-3, 150, 100) == pytest.approx(0.0)      # past the end (e.g. --c with more epochs)
    with pytest.raises(ValueError, match="num_epochs"):
        cosine_lr(1e-3, 0, 0)


def test_ema_warm_up_and_update_by_hand():
    assert ema_decay(0.99, 0) == pytest.approx(0.1)              # (1 + 0) / (10 + 0)
    assert ema_decay(0.99, 8) == pytest.approx(0.5)
    assert ema_decay(0.99, 10_000) == 0.99
    avg, live = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        avg.weight.fill_(1.0), avg.bias.fill_(0.0)
        live.weight.fill_(3.0), live.bias.fill_(2.0)
    ema_update(avg, live, 0.75)
    assert torch.allclose(avg.weight, torch.full((1, 2), 1.5))   # 0.75 * 1 + 0.25 * 3
    assert torch.allclose(avg.bias, torch.tensor([0.5]))
    ema_update(avg, live, 0.0)                                   # decay 0 copies the live weights
    assert torch.equal(avg.weight, live.weight)


def test_intensity_augmentation_changes_only_chosen_tiles_and_keeps_the_input():
    x = torch.randn(64, 1, 4, 8, 8)
    before = x.clone()
    g = torch.Generator().manual_seed(0)
    y = intensity_augmentation(x, 0.5, generator=g)
    assert torch.equal(x, before)
    changed = (y != x).flatten(1).any(1)
    assert 10 < int(changed.sum()) < 54                          # about half of 64
    assert torch.equal(intensity_augmentation(x, 0.0), x)
    # contrast within 15%, brightness within 0.15, noise sigma within 0.1: the mean moves by at most ~0.3
    assert ((y - x).flatten(1).mean(1).abs() < 0.5).all()
    with pytest.raises(ValueError, match="p must be"):
        intensity_augmentation(x, 1.5)


def test_dense_loss_uses_the_max_pooled_lesion_mask():
    lesion = torch.zeros(2, 1, 4, 8, 8, dtype=torch.bool)
    lesion[0, 0, 1, 2, 3] = True                                 # one voxel: its 2x4x4 cell is lesion
    good = torch.full((2, 1, 2, 2, 2), -10.0)
    good[0, 0, 0, 0, 0] = 10.0
    bad = -good
    assert dense_lesion_loss(good, lesion) < 1e-3 < dense_lesion_loss(bad, lesion)
    with pytest.raises(ValueError, match="expected"):
        dense_lesion_loss(good[:, 0], lesion)


def test_glance_dense_head_shapes_and_start_near_half():
    torch.manual_seed(0)
    net = GlanceNet(1, features_per_stage=(4, 8, 16), blocks_per_stage=1, patch_size=(16, 32, 32), dense_stage=1)
    x = torch.randn(3, 1, 16, 32, 32)
    logits, dense = net.forward_dense(x)
    assert logits.shape == (3,) and dense.shape[:2] == (3, 1)
    assert torch.equal(net(x), logits)
    assert (torch.sigmoid(logits) - 0.5).abs().max() < 0.05
    no_dense = GlanceNet(1, features_per_stage=(4, 8, 16), blocks_per_stage=1, dense_stage=None)
    assert no_dense.forward_dense(torch.randn(1, 1, 16, 32, 32))[1] is None
    with pytest.raises(ValueError, match="dense_stage"):
        GlanceNet(1, features_per_stage=(4, 8, 16), blocks_per_stage=1, dense_stage=3)
    assert build_glance(1, (16, 64, 64), base_features=4).encoder.stages[-1].output_channels == 64
    with pytest.raises(ValueError, match="base_features"):
        build_glance(1, (16, 64, 64), base_features=0)


def test_glance_learns_a_lesion_map_from_the_dense_loss_alone():
    """A bright ball in noise: the dense loss alone makes the tile logit (via the central maximum) rank
    lesion tiles first, which is the point of the dense head."""
    torch.manual_seed(0)
    n = 48
    x = torch.randn(n, 1, 16, 32, 32)
    lesion = torch.zeros(n, 1, 16, 32, 32, dtype=torch.bool)
    zz, yy, xx = torch.meshgrid(torch.arange(16), torch.arange(32), torch.arange(32), indexing='ij')
    for i in range(0, n, 2):
        ball = (zz - 8) ** 2 + (yy - 16 + i % 5) ** 2 + (xx - 16) ** 2 <= 9
        lesion[i, 0] = ball
        x[i, 0][ball] += 3.0
    net = GlanceNet(1, features_per_stage=(4, 8, 16), blocks_per_stage=1, patch_size=(16, 32, 32))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(40):
        _, dense = net.forward_dense(x)
        loss = dense_lesion_loss(dense, lesion)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = net(x)
    pos, neg = logits[0::2], logits[1::2]
    assert pos.min() > neg.max(), f"lesion tiles {pos.min():.2f} vs others {neg.max():.2f}"


def test_per_lesion_weights_and_loss_on_a_hand_built_mask():
    """A 4x8x8 tile, map 2x2x2 (cells of 2x4x4 voxels). Lesion 1: one voxel in cell (0,0,0). Lesion 2: a line
    across cells (1,1,0) and (1,1,1). Lesion 3: one voxel in cell (1,1,1), which it shares with lesion 2."""
    ids = torch.zeros(1, 1, 4, 8, 8, dtype=torch.int16)
    ids[0, 0, 0, 1, 1] = 1
    ids[0, 0, 3, 6, 2:6] = 2
    ids[0, 0, 2, 7, 7] = 3
    w = lesion_map_weights(ids, (2, 2, 2))
    expected = torch.zeros(1, 1, 2, 2, 2)
    expected[0, 0, 0, 0, 0] = 1.0            # lesion 1: 1 cell
    expected[0, 0, 1, 1, 0] = 0.5            # lesion 2: 2 cells, 1/2 each
    expected[0, 0, 1, 1, 1] = 0.5 + 1.0      # ... plus lesion 3's one cell
    assert torch.equal(w, expected)
    assert torch.equal(lesion_map_weights(ids, (2, 2, 2), present=[[1, 2, 3]]), expected)

    logits = torch.full((1, 1, 2, 2, 2), -3.0)
    logits[0, 0, 0, 0, 0], logits[0, 0, 1, 1, 0], logits[0, 0, 1, 1, 1] = 2.0, -1.0, 0.0
    logits[0, 0, 0, 1, 1] = 1.0              # one negative cell scored high
    sp = lambda z: math.log1p(math.exp(z))   # softplus: CE of a positive at logit z is sp(-z), of a negative sp(z)
    pos = (1.0 * sp(-2.0) + 0.5 * sp(1.0) + 1.5 * sp(0.0)) / 3.0   # weights sum to 3 lesions
    neg = (4 * sp(-3.0) + sp(1.0)) / 5.0                           # 5 negative cells, unweighted
    loss = dense_lesion_loss(logits, ids > 0, w)
    assert loss.item() == pytest.approx(0.5 * pos + 0.5 * neg, rel=1e-6)
    voxel_balanced = 0.5 * (sp(-2.0) + sp(1.0) + sp(0.0)) / 3.0 + 0.5 * neg
    assert dense_lesion_loss(logits, ids > 0).item() == pytest.approx(voxel_balanced, rel=1e-6)
    no_lesion = torch.zeros_like(ids, dtype=torch.bool)             # one class only: the negatives' mean
    all_negative = (sp(2.0) + sp(-1.0) + sp(0.0) + sp(1.0) + 4 * sp(-3.0)) / 8.0
    assert dense_lesion_loss(logits, no_lesion, torch.zeros_like(w)).item() == pytest.approx(all_negative, rel=1e-6)
    with pytest.raises(ValueError, match="positive_weight"):
        dense_lesion_loss(logits, ids > 0, w[:, :, :1])


def test_dense_shape_is_the_shape_of_the_dense_map():
    for patch, stage in (((16, 48, 48), 1), ((20, 64, 56), 0), ((32, 96, 80), 2)):
        net = GlanceNet(1, features_per_stage=(4, 8, 16, 16), blocks_per_stage=1, patch_size=patch, dense_stage=stage)
        assert tuple(net.forward_dense(torch.zeros(1, 1, *patch))[1].shape[2:]) == net.dense_shape(patch)
    assert GlanceNet(1, features_per_stage=(4, 8), blocks_per_stage=1, dense_stage=None).dense_shape((8, 8, 8)) is None


def test_logit_bound_is_a_soft_monotonic_bound():
    torch.manual_seed(0)
    free = GlanceNet(1, features_per_stage=(4, 8, 16), blocks_per_stage=1, patch_size=(16, 32, 32))
    bounded = GlanceNet(1, features_per_stage=(4, 8, 16), blocks_per_stage=1, patch_size=(16, 32, 32), logit_bound=2.0)
    bounded.load_state_dict(free.state_dict())             # the bound adds no parameter
    with torch.no_grad():
        free.head.bias.fill_(3.0)                          # push the logits past the bound
        bounded.head.bias.fill_(3.0)
        x = torch.randn(6, 1, 16, 32, 32)
        z, b = free(x), bounded(x)
    assert torch.allclose(b, 2.0 * torch.tanh(z / 2.0)) and (b.abs() < 2.0).all() and (z > 2.0).any()
    assert torch.equal(torch.argsort(b), torch.argsort(z))
    with pytest.raises(ValueError, match="logit_bound"):
        GlanceNet(1, features_per_stage=(4, 8), blocks_per_stage=1, logit_bound=-1.0)


def test_label_smoothing_by_hand_and_its_finite_optimum():
    from nnunetv2_gfscreen.core.grl import balanced_bce
    e = 0.1
    sp = lambda z: math.log1p(math.exp(z))
    bce = lambda z, t: t * sp(-z) + (1 - t) * sp(z)        # BCE of logit z against target t
    logits, labels = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 0.0])
    expected = 0.5 * bce(2.0, 1 - e / 2) + 0.5 * (bce(-1.0, e / 2) + bce(0.5, e / 2)) / 2
    assert balanced_bce(logits, labels, label_smoothing=e).item() == pytest.approx(expected, rel=1e-6)
    assert balanced_bce(logits, labels).item() == pytest.approx(0.5 * sp(-2.0) + 0.25 * (sp(-1.0) + sp(0.5)), rel=1e-6)
    # the smoothed CE of a positive is minimal at log((2 - e) / e), not at +infinity
    z = torch.tensor([math.log((2 - e) / e)], requires_grad=True)
    balanced_bce(z, torch.ones(1), label_smoothing=e).backward()
    assert abs(z.grad.item()) < 1e-6
    # the dense loss smooths its targets the same way (one lesion cell at logit 2, seven others at -1)
    lesion = torch.zeros(1, 1, 2, 2, 2, dtype=torch.bool)
    lesion[0, 0, 0, 0, 0] = True
    dense = torch.full((1, 1, 2, 2, 2), -1.0)
    dense[0, 0, 0, 0, 0] = 2.0
    expected = 0.5 * bce(2.0, 1 - e / 2) + 0.5 * bce(-1.0, e / 2)
    assert dense_lesion_loss(dense, lesion, label_smoothing=e).item() == pytest.approx(expected, rel=1e-6)
    weight = lesion.float()
    assert dense_lesion_loss(dense, lesion, weight, label_smoothing=e).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        balanced_bce(logits, labels, label_smoothing=1.0)
