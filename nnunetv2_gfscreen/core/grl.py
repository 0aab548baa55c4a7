"""Group relative learning (GRL): rewards, advantages and the Glance policy loss.

The Glance is a Bernoulli policy over one action per tile, "select". Each function here is a pure
tensor function so that the trainer, the tests and the ablations share one definition of the maths
(GF-Screen, arXiv 2601.19103, "group relative learning"). Shapes: ``B`` is the number of tiles (sub-volumes)
in a batch, made of groups of tiles cropped from the same CT.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shapes must match, got {shapes}")


def _check_1d(**tensors: Tensor) -> None:
    for name, t in tensors.items():
        if t.ndim != 1:
            raise ValueError(f"{name} must have shape (B,), got {tuple(t.shape)}")
    _check_same_shape(**tensors)


def _check_finite(**tensors: Tensor) -> None:
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or inf: {t.detach().cpu().tolist()}")


def _check_masks(pred_fg: Tensor, gt_fg: Tensor, valid: Optional[Tensor]) -> None:
    masks = {'pred_fg': pred_fg, 'gt_fg': gt_fg}
    if valid is not None:
        masks['valid'] = valid
    for name, m in masks.items():
        if m.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool mask, got dtype {m.dtype}")
        if m.ndim < 2:
            raise ValueError(f"{name} must have shape (B, *spatial), got {tuple(m.shape)}")
    _check_same_shape(**masks)


def detection_reward(pred_fg: Tensor, gt_fg: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Binary detection reward: did the Focus prediction touch the lesion in this tile?

    ``r_i = 1`` if at least one voxel is foreground in both ``pred_fg[i]`` and ``gt_fg[i]``
    (counting only voxels where ``valid[i]`` is True, e.g. to leave out nnU-Net's ignore label),
    else ``0``. A tile without lesion therefore always gets 0. The paper prefers this to a Dice
    reward, which steers the Glance towards easy views.

    Args:
        pred_fg: bool (B, *spatial), Focus foreground.
        gt_fg: bool (B, *spatial), ground-truth foreground.
        valid: optional bool (B, *spatial); voxels where it is False are ignored.

    Returns:
        float32 (B,) of 0.0 / 1.0, no gradient.
    """
    _check_masks(pred_fg, gt_fg, valid)
    hit = pred_fg & gt_fg
    if valid is not None:
        hit = hit & valid
    return hit.flatten(1).any(dim=1).float()


def dice_reward(pred_fg: Tensor, gt_fg: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Per-tile Dice ``2|P & G| / (|P| + |G|)`` as a reward; for the reward ablation only.

    When prediction and ground truth are both empty the reward is 0, not the usual Dice of 1:
    a tile without lesion must never be rewarded, as with the binary detection reward, so the
    reward stays about finding lesions and the Glance is not paid for selecting empty tiles.

    Args:
        pred_fg, gt_fg: bool (B, *spatial).
        valid: optional bool (B, *spatial); voxels where it is False count in neither mask.

    Returns:
        float32 (B,) in [0, 1], no gradient.
    """
    _check_masks(pred_fg, gt_fg, valid)
    if valid is not None:
        pred_fg = pred_fg & valid
        gt_fg = gt_fg & valid
    inter = (pred_fg & gt_fg).flatten(1).sum(dim=1).float()
    total = pred_fg.flatten(1).sum(dim=1).float() + gt_fg.flatten(1).sum(dim=1).float()
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.zeros_like(total))


def group_relative_advantages(rewards: Tensor, group_ids: Tensor, eps: float = 1e-6,
                              check_values: bool = True) -> Tensor:
    """GRPO advantage ``A_i = (r_i - mean_g(r)) / std_g(r)`` within the group ``g`` of tile ``i``.

    The group (all tiles cropped from one CT) replaces a value network as the baseline. ``std`` is
    the population (biased, divide by n) standard deviation, so rewards [1, 0, 0, 0] give
    mean 1/4, std sqrt(3)/4 and advantages [3, -1, -1, -1] / sqrt(3). A group whose std is below
    ``eps`` (all rewards equal, or a single tile) gets all-zero advantages, never NaN: then only
    the KL and CE terms act on it. Groups may be interleaved and of different sizes.

    Args:
        rewards: float (B,).
        group_ids: integer (B,), any values; equal ids form a group.
        eps: std threshold below which a group's advantages are zero.
        check_values: raise for non-finite rewards (reads the values: a host synchronisation on a GPU).

    Returns:
        float (B,), no gradient.
    """
    _check_1d(rewards=rewards, group_ids=group_ids)
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise TypeError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if check_values:
        _check_finite(rewards=rewards)
    rewards = rewards.detach().float()
    # (B, B) same-group matrix instead of torch.unique: no data-dependent size, so no host synchronisation
    same = (group_ids[:, None] == group_ids[None, :]).float()
    counts = same.sum(1)
    mean = same @ rewards / counts
    centred = rewards - mean
    var = (same * (rewards[None, :] - mean[:, None]) ** 2).sum(1) / counts
    std = var.sqrt()
    flat = std < eps
    return torch.where(flat, torch.zeros_like(centred), centred / torch.where(flat, torch.ones_like(std), std))


def clipped_surrogate(logp: Tensor, logp_ref: Tensor, advantages: Tensor, clip_eps: float,
                      dual_clip: Optional[float] = None) -> Tensor:
    """PPO clipped surrogate loss ``-mean_i min(ratio_i A_i, clip(ratio_i, 1-eps, 1+eps) A_i)``.

    ``ratio_i = exp(logp_i - logp_ref_i) = pi(select|x_i) / pi_ref(select|x_i)``. Where the clip
    is active (ratio > 1+eps with A > 0, ratio < 1-eps with A < 0) the term is constant, so its
    gradient is zero: the policy cannot move further than eps from the reference in one round.

    The min leaves one side open: a tile with A < 0 whose select probability rose far above the
    reference's (ratio >> 1+eps, e.g. pushed up by the CE term during an epoch) costs ``-ratio A``
    without bound, and the ratio of a small probability grows exponentially in the logit (a logit
    4 higher at p_ref = 0.01 gives ratio 50). ``dual_clip = c > 1`` (dual-clip PPO, Ye et al.
    2020) caps that side: for A < 0 the term is ``max(min(...), c A)``, constant (no gradient)
    beyond ratio c. ``None`` gives the plain PPO clip.

    Args:
        logp: float (B,), log pi(select | x), with gradient.
        logp_ref: float (B,), log pi_ref(select | x); treat as a constant (detach it).
        advantages: float (B,), constants.
        clip_eps: clip range eps, in (0, 1).
        dual_clip: None, or the cap c > 1 on the ratio for negative advantages.

    Returns:
        scalar loss.
    """
    _check_1d(logp=logp, logp_ref=logp_ref, advantages=advantages)
    if not 0 < clip_eps < 1:
        raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be None or > 1, got {dual_clip}")
    ratio = torch.exp(logp - logp_ref)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages
    objective = torch.minimum(unclipped, clipped)
    if dual_clip is not None:
        objective = torch.where(advantages < 0, torch.maximum(objective, dual_clip * advantages), objective)
    return -objective.mean()


def kl_k3(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """k3 estimator of KL(pi || pi_ref): ``mean(q - log q - 1)`` with ``q = pi_ref / pi``.

    Computed from log-probabilities, ``q = exp(logp_ref - logp)``. Each term is >= 0 and zero
    exactly when ``logp == logp_ref``, so it is an unbiased, non-negative penalty that keeps the
    Glance close to its reference.

    Args:
        logp: float (B,), log pi(select | x), with gradient.
        logp_ref: float (B,), log pi_ref(select | x).

    Returns:
        scalar.
    """
    _check_1d(logp=logp, logp_ref=logp_ref)
    log_q = logp_ref - logp
    return (torch.exp(log_q) - log_q - 1).mean()


def balanced_bce(logits: Tensor, labels: Tensor, check_values: bool = True, label_smoothing: float = 0.0) -> Tensor:
    """Class-balanced binary cross-entropy ``0.5 mean_pos(CE) + 0.5 mean_neg(CE)``.

    Lesion tiles are rare; weighting both classes equally keeps the auxiliary CE from collapsing the
    Glance to "reject all". If the batch holds only one class, the mean over that class is returned.
    With ``label_smoothing`` e the CE targets are ``1 - e/2`` and ``e/2`` (the classes are still split by
    the 0/1 labels): the loss is then minimal at the finite logits ``+-log((2 - e) / e)`` instead of at
    +-infinity, so separable tiles stop pushing the logits apart.

    Args:
        logits: float (B,), select logits.
        labels: (B,) of 0/1 (bool, integer or float), 1 = the tile holds lesion voxels.
        check_values: raise for labels other than 0/1 (reads the values: a host synchronisation on a GPU).
        label_smoothing: e in [0, 1).

    Returns:
        scalar.
    """
    _check_1d(logits=logits, labels=labels)
    if logits.numel() == 0:
        raise ValueError("balanced_bce needs at least one sample, got an empty batch")
    labels = labels.to(logits.dtype)
    if check_values and not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError(f"labels must be 0 or 1, got {labels.detach().cpu().tolist()}")
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    targets = labels * (1 - label_smoothing) + 0.5 * label_smoothing if label_smoothing else labels
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction='none')
    pos = labels == 1
    # written without branching on values (no host synchronisation)
    n_pos, n_neg = pos.sum(), (~pos).sum()
    balanced = 0.5 * (ce * pos).sum() / n_pos.clamp_min(1) + 0.5 * (ce * ~pos).sum() / n_neg.clamp_min(1)
    return torch.where((n_pos == 0) | (n_neg == 0), ce.mean(), balanced)


@dataclass
class GRLTerms:
    """Unweighted loss terms and the weighted total ``clip + beta * kl + alpha * ce``."""
    clip: Tensor
    kl: Tensor
    ce: Tensor
    total: Tensor


def grl_loss(glance_logits: Tensor, ref_logits: Tensor, rewards: Tensor, lesion_labels: Tensor,
             group_ids: Tensor, clip_eps: float = 0.1, beta: float = 0.01, alpha: float = 0.1,
             dual_clip: Optional[float] = 3.0, check_values: bool = True, label_smoothing: float = 0.0) -> GRLTerms:
    """GRL objective of the Glance: ``L = L_clip + beta * KL_k3 + alpha * balanced_CE``.

    ``logp = logsigmoid(glance_logits)`` and ``logp_ref = logsigmoid(ref_logits)`` (detached) are
    the log-probabilities of "select" under the live and the frozen reference Glance; advantages
    come from ``group_relative_advantages(rewards, group_ids)`` and carry no gradient.
    ``alpha = 0`` skips the CE (the "no alpha-CE" ablation); ``ce`` is then a zero tensor.

    Args:
        glance_logits: float (B,), live Glance logits, with gradient.
        ref_logits: float (B,), reference Glance logits on the same tiles.
        rewards: float (B,), e.g. from ``detection_reward``.
        lesion_labels: (B,) of 0/1, 1 = the tile holds lesion voxels.
        group_ids: integer (B,), the CT each tile was cropped from.
        clip_eps, beta, alpha: clip range and the weights of the KL and CE terms.
        dual_clip: cap on the ratio for negative advantages (see ``clipped_surrogate``); None: plain PPO clip.
        check_values: raise ValueError for NaN/inf logits or rewards and non-0/1 labels. Reading values is a
            host synchronisation on a GPU; the trainer passes False, and a non-finite logit (fp16 overflow)
            then gives a non-finite loss whose step the GradScaler skips, as nnU-Net's own steps are skipped.
        label_smoothing: of the CE term's targets (see ``balanced_bce``); 0 is the paper's CE.

    Returns:
        GRLTerms with the *unweighted* ``clip``, ``kl``, ``ce`` and the weighted ``total``.
    """
    _check_1d(glance_logits=glance_logits, ref_logits=ref_logits, rewards=rewards,
              lesion_labels=lesion_labels, group_ids=group_ids)
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if check_values:
        _check_finite(glance_logits=glance_logits.detach(), ref_logits=ref_logits.detach(), rewards=rewards)
    logp = F.logsigmoid(glance_logits)
    logp_ref = F.logsigmoid(ref_logits).detach()
    advantages = group_relative_advantages(rewards, group_ids, check_values=check_values)
    clip = clipped_surrogate(logp, logp_ref, advantages, clip_eps, dual_clip)
    kl = kl_k3(logp, logp_ref)
    total = clip + beta * kl
    if alpha > 0:
        ce = balanced_bce(glance_logits, lesion_labels, check_values=check_values, label_smoothing=label_smoothing)
        total = total + alpha * ce
    else:
        ce = torch.zeros((), dtype=total.dtype, device=total.device)
    return GRLTerms(clip=clip, kl=kl, ce=ce, total=total)
