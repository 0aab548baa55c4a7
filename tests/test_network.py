"""GFScreenNetwork: the gate inside the network (the stock nnUNetv2_predict path), one Glance pass per tile."""
import itertools

import pytest
import torch

from nnunetv2_gfscreen.core.gate import Gate, GateRule, select_tiles
from nnunetv2_gfscreen.core.network import GFScreenNetwork
from tests.toy_models import MeanIntensityGlance, TiltedGlance, tiny_focus


def _net(offset=0.0, threshold=0.0):
    return GFScreenNetwork(tiny_focus(), MeanIntensityGlance(offset), 2, GateRule(threshold=threshold)).eval()


def _count_calls(module, log):
    forward = module.forward
    module.forward = lambda x: log.append(x.shape[0]) or forward(x)


def test_eval_mode_gates_with_zero_logits():
    net = _net()
    focus_tiles = []
    _count_calls(net.focus, focus_tiles)
    x = torch.randn(3, 1, 16, 32, 32) * 0.1
    x[0] += 1.0  # bright tile: mean > 0 -> logit > 0 -> selected
    x[1] -= 1.0  # dark tiles: rejected
    x[2] -= 1.0
    with torch.no_grad():
        out = net(x)
        dense = net.focus(x[:1])
    torch.testing.assert_close(out[0], dense[0])
    assert torch.count_nonzero(out[1:]) == 0
    assert focus_tiles[0] == 1  # the rejected tiles never reached the Focus


def test_training_and_ungated_run_the_focus_densely():
    net = _net()
    x = -torch.ones(2, 1, 16, 32, 32)
    with torch.no_grad():
        with net.ungated():
            torch.testing.assert_close(net(x), net.focus(x))
        assert net.gating_enabled
        net.train()
        assert torch.count_nonzero(net(x)) > 0


def test_gate_rule_is_saved_and_loaded_strictly():
    net = _net()
    rule = GateRule(threshold=12.5, floor=0.05, envelope=(-20.0, -3.0), calibrated=True)
    net.gate.set_rule(rule)
    fresh = _net()
    fresh.load_state_dict(net.state_dict(), strict=True)
    assert fresh.gate.rule == rule
    assert Gate.rule_from_state_dict(net.state_dict()) == rule
    assert net.state_dict()["gate.threshold"].dtype == torch.float64
    with pytest.raises(KeyError, match="gate"):
        Gate.rule_from_state_dict({"threshold": torch.tensor(0.5)})


def test_decoder_is_the_focus_decoder_for_nnunet_deep_supervision_switch():
    net = _net()
    assert net.decoder is net.focus.decoder


def test_select_tiles_refuses_nan():
    with pytest.raises(ValueError, match="NaN"):
        select_tiles(torch.tensor([0.2, float("nan")], dtype=torch.float64), 0.5)
    assert select_tiles(torch.tensor([0.2, 0.6], dtype=torch.float64), 0.5).tolist() == [False, True]


# ---------------------------------------------------------------------- one decision and one Glance pass per tile
FLIPS = [c for k in range(1, 4) for c in itertools.combinations((2, 3, 4), k)]


def test_stock_tta_copies_get_the_tile_decision_with_one_glance_pass():
    """nnU-Net's TTA hands the network a tile, then its 7 flips: they get the tile's decision, and the Glance
    (which here is not flip-invariant) runs once, not 8 times."""
    net = GFScreenNetwork(tiny_focus(), TiltedGlance(offset=0.0, tilt=4.0), 2, GateRule(threshold=0.0)).eval()
    glance_tiles = []
    _count_calls(net.glance, glance_tiles)
    x = torch.randn(1, 1, 16, 32, 32, generator=torch.Generator().manual_seed(3))
    x[:, :, :6, :10, :10] += 2.0
    # shift so that the raw Glance would decide differently for some flip
    raw = torch.stack([net.glance(torch.flip(x, f)).double() for f in [()] + FLIPS]).flatten()
    x -= float(raw.median()) / 10
    raw = torch.stack([net.glance(torch.flip(x, f)).double() for f in [()] + FLIPS]).flatten()
    assert len({bool(v > 0) for v in raw}) == 2  # the toy Glance is not flip-invariant
    glance_tiles.clear()
    with torch.no_grad():
        outs = [net(x)] + [net(torch.flip(x, f)) for f in FLIPS]
    assert sum(glance_tiles) == 1
    decided = {bool(o.abs().sum() > 0) for o in outs}
    assert decided == {bool(raw[0] > 0)}
    # a different tile is scored on its own; a new threshold or a new fold's weights forget the decision
    with torch.no_grad():
        net(x + 1)
        assert sum(glance_tiles) == 2
        net.gate.set_rule(GateRule(threshold=-1e9))
        assert net(torch.flip(x + 1, FLIPS[0])).abs().sum() > 0 and sum(glance_tiles) == 3
        net.load_state_dict(net.state_dict())
        net(torch.flip(x + 1, FLIPS[0]))
        assert sum(glance_tiles) == 4


# ---------------------------------------------------------------------- torch.compile
import torch._dynamo
from torch._dynamo.testing import CompileCounter


class _GraphCounter(CompileCounter):
    """CompileCounter that also remembers whether each compiled graph holds a convolution (the Focus's)."""

    def __call__(self, gm, example_inputs):
        self.conv_graphs = getattr(self, "conv_graphs", 0) + any("conv" in str(n.target) for n in gm.graph.nodes)
        return super().__call__(gm, example_inputs)


def test_compiled_gated_network_does_not_recompile_per_call(monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)  # no silent eager fallback
    net = _net()
    counter = _GraphCounter()
    compiled = torch.compile(net, backend=counter)
    g = torch.Generator().manual_seed(0)
    selections, frames = set(), []
    with torch.no_grad():
        for i in range(30):
            b = (1, 3, 2)[i % 3]  # batch 1 as in nnU-Net's loop, and sub-batches of every size
            x = torch.randn(b, 1, 16, 32, 32, generator=g) * 0.1 + (torch.rand(b, 1, 1, 1, 1, generator=g) - 0.5) * 2
            out = compiled(x)
            torch.testing.assert_close(out, net(x), rtol=1e-5, atol=1e-5)
            selections.add((b, int((out.flatten(1).abs().sum(1) > 0).sum())))
            frames.append(counter.frame_count)
    assert len(selections) >= 7  # 0..b tiles selected out of b, for b = 1, 2, 3
    assert frames[-1] == frames[14] and frames[-1] <= 12  # bounded: nothing compiles after the first half
    assert counter.conv_graphs >= 1  # the Focus itself is compiled, not run eagerly
    torch._dynamo.reset()
