"""The one gate decision (core/gate.py), by hand."""
import pytest
import torch

from nnunetv2_gfscreen.core.gate import GateRule, case_statistic, decide, pool_rules, select_tiles, top_share


def L(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_threshold_alone():
    d = decide(L(5, 1, -3, -10), GateRule(threshold=2.0))
    assert d.selected.tolist() == [True, False, False, False]
    assert (d.by_threshold, d.by_floor, d.fallback, d.by_fallback) == (1, 0, False, 0)
    assert select_tiles(L(5, 1), 1.0).tolist() == [True, False]  # strictly above


def test_floor_adds_the_top_ranked_tiles_whatever_their_logits():
    d = decide(L(-50, -40, -45, -60), GateRule(threshold=2.0, floor=0.5))  # every logit shifted far below
    assert d.selected.tolist() == [False, True, True, False]  # the two highest: -40 and -45
    assert (d.by_threshold, d.by_floor) == (0, 2)
    # ceil(share * T) tiles: 0.26 of 4 tiles is 2 tiles; ties go by tile order
    assert top_share(L(1, 1, 1, 1), 0.26).tolist() == [True, True, False, False]
    assert top_share(L(1, 2, 3), 0.0).tolist() == [False, False, False]
    assert top_share(L(1, 2, 3), 1.0).tolist() == [True, True, True]


def test_fallback_outside_the_envelope_selects_every_tile():
    logits = L(5, 1, -3, -10, -12, -11, -9, -8, -10, -11, -13)  # 11 tiles
    # the baseline: the 10th percentile, the lower order statistic: sorted[int(0.1 * 10)] = sorted[1] = -12
    assert case_statistic(logits) == -12.0
    # lesions do not move it, the median would: more lesion tiles, same baseline
    assert case_statistic(torch.cat([logits[:1].repeat(6), logits[4:]])) == -12.0
    inside = decide(logits, GateRule(threshold=2.0, envelope=(-15.0, -11.0)))
    assert not inside.fallback and inside.selected.sum() == 1
    outside = decide(logits, GateRule(threshold=2.0, envelope=(-11.5, -5.0)))
    assert outside.fallback and outside.selected.all() and outside.by_fallback == 10
    wider = decide(logits, GateRule(threshold=2.0, envelope=(-11.5, -5.0), fallback_selection=0.2))
    assert wider.selected.tolist() == [True, True, True] + [False] * 8  # top ceil(0.2 * 11) = 3


def test_pooled_rule_of_a_fold_ensemble():
    a = GateRule(threshold=2.0, floor=0.01, envelope=(-10.0, -2.0), calibrated=True)
    b = GateRule(threshold=4.0, floor=0.03, envelope=(-8.0, 0.0), calibrated=False)
    p = pool_rules([a, b])
    assert (p.threshold, p.floor, p.envelope, p.calibrated) == (3.0, 0.03, (-9.0, -1.0), False)
    assert pool_rules([a]) == a
    assert pool_rules([a, GateRule(threshold=0.0)]).envelope is None
    with pytest.raises(ValueError):
        pool_rules([])


def test_bad_rules_and_scores_are_refused():
    with pytest.raises(ValueError, match="floor"):
        GateRule(floor=1.5)
    with pytest.raises(ValueError, match="envelope"):
        GateRule(envelope=(1.0, -1.0))
    with pytest.raises(ValueError, match="NaN"):
        decide(L(1.0, float("nan")), GateRule())
    assert GateRule.from_dict(GateRule(3.0, 0.1, (-1.0, 1.0), 0.5, True).to_dict()) == GateRule(3.0, 0.1, (-1.0, 1.0),
                                                                                                   0.5, True)
