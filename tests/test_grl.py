import math

import pytest
import torch
import torch.nn.functional as F

from nnunetv2_gfscreen.core.grl import (GRLTerms, balanced_bce, clipped_surrogate, detection_reward, dice_reward,
                                   group_relative_advantages, grl_loss, kl_k3)


# ---------------------------------------------------------------- rewards

def _masks():
    """Four 4x4x4 tiles: one-voxel touch, disjoint neighbours, empty gt, one-voxel overlap."""
    pred = torch.zeros(4, 4, 4, 4, dtype=torch.bool)
    gt = torch.zeros_like(pred)
    pred[0, 1, 1, 1] = True
    gt[0, 1:3, 1:3, 1:3] = True          # shares exactly voxel (1, 1, 1)
    pred[1, 0, 0, 0] = True
    gt[1, 0, 0, 1:] = True               # face-adjacent, no shared voxel
    pred[2, 2, 2, 2] = True              # gt empty
    pred[3, :2] = True
    gt[3, 1:3] = True                    # overlap is the slab z == 1
    return pred, gt


def test_detection_reward_hand_masks():
    pred, gt = _masks()
    assert detection_reward(pred, gt).tolist() == [1.0, 0.0, 0.0, 1.0]
    valid = torch.ones_like(pred)
    valid[3, 1] = False                  # the ignore label covers the whole overlap of tile 3
    assert detection_reward(pred, gt, valid).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert detection_reward(pred, gt).dtype == torch.float32


def test_detection_reward_rejects_non_bool_and_bad_shapes():
    pred, gt = _masks()
    with pytest.raises(TypeError, match='int64'):
        detection_reward(pred.long(), gt)
    with pytest.raises(ValueError, match=r'\(4, 4, 4, 4\)'):
        detection_reward(pred, gt[:, :3])
    with pytest.raises(ValueError, match='B, \\*spatial'):
        detection_reward(pred[:, 0, 0, 0], gt[:, 0, 0, 0])


def test_dice_reward_hand_values():
    pred = torch.zeros(4, 1, 2, 5, dtype=torch.bool)
    gt = torch.zeros_like(pred)
    pred[0, 0, 0, :2] = True             # 2 voxels
    gt[0, 0, 0, 1:4] = True              # 3 voxels, 1 shared -> 2 * 1 / 5
    pred[1, 0, 1] = True                 # identical -> 1
    gt[1, 0, 1] = True
    # tile 2: both empty -> 0 (an empty tile is never rewarded)
    pred[3, 0, 0, 0] = True              # pred only -> 0
    assert torch.allclose(dice_reward(pred, gt), torch.tensor([0.4, 1.0, 0.0, 0.0]))
    valid = torch.ones_like(pred)
    valid[0, 0, 0, 3] = False            # gt of tile 0 shrinks to 2 voxels -> 2 * 1 / 4
    valid[1] = False                     # everything ignored -> both empty -> 0
    assert torch.allclose(dice_reward(pred, gt, valid), torch.tensor([0.5, 0.0, 0.0, 0.0]))


# ---------------------------------------------------------------- advantages

def test_advantages_one_hot_group():
    adv = group_relative_advantages(torch.tensor([1., 0., 0., 0.]), torch.zeros(4, dtype=torch.long))
    # mean 1/4, population std sqrt(1/4 * 3/4) = sqrt(3)/4
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (math.sqrt(3) / 4)
    assert torch.allclose(adv, expected)
    assert torch.allclose(adv / adv[1].abs(), torch.tensor([3., -1., -1., -1.]))


def test_advantages_interleaved_groups_of_different_size():
    rewards = torch.tensor([1., 1., 0., 0., 0., 1., 0., 1.])
    ids = torch.tensor([7, 3, 7, 3, 7, 3, 12, 12])
    adv = group_relative_advantages(rewards, ids)
    r2 = math.sqrt(2)
    # group 7: [1, 0, 0], mean 1/3, std sqrt(2)/3; group 3: [1, 0, 1]; group 12: [0, 1], std 1/2
    expected = torch.tensor([r2, 1 / r2, -1 / r2, -r2, -1 / r2, 1 / r2, -1., 1.])
    assert torch.allclose(adv, expected, atol=1e-6)


def test_advantages_flat_groups_are_zero_not_nan():
    rewards = torch.tensor([1., 1., 1., 0., 0., 1., 0., 5.])
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])   # group 3 has a single tile
    adv = group_relative_advantages(rewards, ids)
    assert torch.isfinite(adv).all()
    assert adv[:5].eq(0).all() and adv[7] == 0
    assert torch.allclose(adv[5:7], torch.tensor([1., -1.]))


def test_advantages_reject_bad_input():
    with pytest.raises(ValueError, match='NaN'):
        group_relative_advantages(torch.tensor([1., float('nan')]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r'\(3,\).*\(2,\)'):
        group_relative_advantages(torch.ones(3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match='float32'):
        group_relative_advantages(torch.ones(2), torch.zeros(2))


# ---------------------------------------------------------------- clipped surrogate and KL

def test_clipped_surrogate_both_sides_of_the_clip():
    ratio = torch.tensor([1.5, 0.5, 1.1, 0.5])
    adv = torch.tensor([2., -1., 1., 1.])
    logp_ref = torch.full((4,), math.log(0.4))
    logp = (torch.log(ratio) + logp_ref).requires_grad_()
    loss = clipped_surrogate(logp, logp_ref, adv, clip_eps=0.2)
    # min(3.0, 1.2 * 2) = 2.4 (clipped), min(-0.5, 0.8 * -1) = -0.8 (clipped),
    # 1.1 inside the band, min(0.5, 0.8) = 0.5 (below the band with A > 0 is not clipped)
    assert loss.item() == pytest.approx(-(2.4 - 0.8 + 1.1 + 0.5) / 4)
    loss.backward()
    # d/dlogp of -ratio * A / B = -ratio * A / 4 where unclipped, 0 where clipped
    assert torch.allclose(logp.grad, torch.tensor([0., 0., -1.1 / 4, -0.5 / 4]))


def test_dual_clip_caps_only_negative_advantages_far_above_the_reference():
    ratio = torch.tensor([5.0, 2.0, 5.0, 0.5])
    adv = torch.tensor([-1., -1., 2., -1.])
    logp_ref = torch.full((4,), math.log(0.1))
    logp = (torch.log(ratio) + logp_ref).requires_grad_()
    plain = clipped_surrogate(logp, logp_ref, adv, clip_eps=0.2)
    # plain PPO: min(-5, -1.2) = -5, min(-2, -1.2) = -2, min(10, 2.4) = 2.4, min(-0.5, -0.8) = -0.8
    assert plain.item() == pytest.approx(-(-5 - 2 + 2.4 - 0.8) / 4)
    loss = clipped_surrogate(logp, logp_ref, adv, clip_eps=0.2, dual_clip=3.0)
    # dual clip, A < 0 only: max(-5, 3 * -1) = -3 (capped), max(-2, -3) = -2, A > 0 untouched, max(-0.8, -3) = -0.8
    assert loss.item() == pytest.approx(-(-3 - 2 + 2.4 - 0.8) / 4)
    loss.backward()
    # gradient zero where capped or clipped; -ratio * A / 4 = 2 / 4 for the ratio-2 tile below the cap
    assert torch.allclose(logp.grad, torch.tensor([0., 0.5, 0., 0.]))


def test_clipped_surrogate_rejects_bad_eps_and_shapes():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match='clip_eps'):
        clipped_surrogate(x, x, x, clip_eps=1.5)
    with pytest.raises(ValueError, match='dual_clip'):
        clipped_surrogate(x, x, x, clip_eps=0.1, dual_clip=1.0)
    with pytest.raises(ValueError, match=r'\(3,\)'):
        clipped_surrogate(x, x, torch.zeros(2), clip_eps=0.1)


def test_kl_k3_hand_value_and_zero_for_equal_policies():
    logp = torch.log(torch.tensor([0.5, 0.3]))
    logp_ref = torch.log(torch.tensor([0.25, 0.3]))
    # q = 0.25 / 0.5 = 0.5: q - log q - 1 = ln 2 - 0.5; second tile equal -> 0
    assert kl_k3(logp, logp_ref).item() == pytest.approx((math.log(2) - 0.5) / 2)
    assert kl_k3(logp, logp).item() == 0.0
    other = torch.log(torch.tensor([0.9, 0.01]))
    assert kl_k3(logp, other).item() > 0 and kl_k3(other, logp).item() > 0


# ---------------------------------------------------------------- balanced CE

def test_balanced_bce_hand_value():
    logits = torch.tensor([0., 0., math.log(3)])
    labels = torch.tensor([1, 0, 0])
    # CE: ln2 (pos), ln2 (neg), -ln(1 - 3/4) = ln4 (neg) -> 0.5 ln2 + 0.5 (ln2 + ln4) / 2
    assert balanced_bce(logits, labels).item() == pytest.approx(1.25 * math.log(2))
    assert F.binary_cross_entropy_with_logits(logits, labels.float()).item() != pytest.approx(1.25 * math.log(2))


def test_balanced_bce_one_class_batches():
    logits = torch.tensor([0., math.log(3)])
    # all positive: mean(ln2, -ln(3/4))
    assert balanced_bce(logits, torch.tensor([True, True])).item() == pytest.approx(
        (math.log(2) + math.log(4 / 3)) / 2)
    # all negative: mean(ln2, ln4)
    assert balanced_bce(logits, torch.zeros(2)).item() == pytest.approx(1.5 * math.log(2))
    with pytest.raises(ValueError, match='0 or 1'):
        balanced_bce(logits, torch.tensor([0.5, 1.]))


def test_balanced_bce_is_stable_for_large_logits():
    out = balanced_bce(torch.tensor([200., -200.]), torch.tensor([0, 1]))
    assert torch.isfinite(out) and out.item() == pytest.approx(200.)


# ---------------------------------------------------------------- grl_loss

def _grl_inputs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, generator=g).requires_grad_()
    ref = torch.randn(8, generator=g).requires_grad_()
    rewards = torch.tensor([1., 0., 0., 1., 0., 0., 0., 0.])
    labels = torch.tensor([1, 0, 1, 1, 0, 0, 0, 0])
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    return logits, ref, rewards, labels, ids


def test_grl_loss_total_is_weighted_sum_of_unweighted_terms():
    logits, ref, rewards, labels, ids = _grl_inputs()
    terms = grl_loss(logits, ref, rewards, labels, ids, clip_eps=0.1, beta=0.01, alpha=0.1)
    assert isinstance(terms, GRLTerms)
    logp, logp_ref = F.logsigmoid(logits), F.logsigmoid(ref)
    adv = group_relative_advantages(rewards, ids)
    assert terms.clip.item() == pytest.approx(clipped_surrogate(logp, logp_ref, adv, 0.1, dual_clip=3.0).item())
    assert terms.kl.item() == pytest.approx(kl_k3(logp, logp_ref).item())
    assert terms.ce.item() == pytest.approx(balanced_bce(logits, labels).item())
    assert terms.total.item() == pytest.approx(terms.clip.item() + 0.01 * terms.kl.item() + 0.1 * terms.ce.item())
    terms.total.backward()
    assert ref.grad is None                      # the reference policy is a constant


def test_grl_loss_alpha_zero_skips_ce():
    logits, ref, rewards, labels, ids = _grl_inputs()
    terms = grl_loss(logits, ref, rewards, labels, ids, alpha=0.0, beta=0.5)
    assert terms.ce.item() == 0.0
    assert terms.total.item() == pytest.approx(terms.clip.item() + 0.5 * terms.kl.item())


def test_grl_loss_gradient_pushes_rewarded_tiles_up_at_ratio_one():
    logits, _, rewards, labels, ids = _grl_inputs()
    terms = grl_loss(logits, logits.detach().clone(), rewards, labels, ids, alpha=0.0)
    assert terms.kl.item() == pytest.approx(0.0, abs=1e-7)
    terms.total.backward()
    # ratio = 1, no clip, KL gradient 0: dL/dlogit_i = -A_i * (1 - sigmoid(logit_i)) / B
    adv = group_relative_advantages(rewards, ids)
    expected = -adv * (1 - torch.sigmoid(logits.detach())) / 8
    assert torch.allclose(logits.grad, expected, atol=1e-6)
    grad0, rewards0 = logits.grad[:4], rewards[:4]
    assert (grad0[rewards0 == 1] < 0).all() and (grad0[rewards0 == 0] > 0).all()
    assert logits.grad[4:].eq(0).all()          # group 1 has no reward at all: no clip gradient


def test_grl_loss_rejects_mismatched_shapes_and_nan():
    logits, ref, rewards, labels, ids = _grl_inputs()
    with pytest.raises(ValueError, match=r'\(8,\).*\(7,\)'):
        grl_loss(logits, ref[:7], rewards, labels, ids)
    with pytest.raises(ValueError, match=r'\(8, 1\)'):
        grl_loss(logits[:, None], ref, rewards, labels, ids)
    bad = rewards.clone()
    bad[2] = float('nan')
    with pytest.raises(ValueError, match='rewards'):
        grl_loss(logits, ref, bad, labels, ids)
    with pytest.raises(ValueError, match='alpha'):
        grl_loss(logits, ref, rewards, labels, ids, alpha=-1.0)
