import torch

from nnunetv2_gfscreen.core.network import GFScreenNetwork
from nnunetv2_gfscreen.core.network import select_tiles
from tests.toy_models import MeanIntensityGlance, tiny_focus

import pytest


def _net(offset=0.0):
    return GFScreenNetwork(tiny_focus(), MeanIntensityGlance(offset), num_classes=2, threshold=0.5).eval()


def test_eval_mode_gates_with_zero_logits():
    net = _net()
    x = torch.randn(3, 1, 16, 32, 32) * 0.1
    x[0] += 1.0  # bright tile: mean > 0 -> selected
    x[1] -= 1.0  # dark tiles: rejected
    x[2] -= 1.0
    with torch.no_grad():
        out = net(x)
        dense = net.focus(x)
    assert out.shape == dense.shape
    torch.testing.assert_close(out[0], dense[0])
    assert torch.count_nonzero(out[1:]) == 0
    assert (net.tiles_scored, net.tiles_selected) == (3, 1)


def test_training_and_ungated_run_the_focus_densely():
    net = _net()
    x = -torch.ones(2, 1, 16, 32, 32)
    with torch.no_grad():
        with net.ungated():
            torch.testing.assert_close(net(x), net.focus(x))
        assert net.gating_enabled
        net.train()
        assert torch.count_nonzero(net(x)) > 0
    assert net.tiles_scored == 0


def test_threshold_is_saved_and_loaded_strictly():
    net = _net()
    net.threshold.fill_(0.123)
    fresh = _net()
    fresh.load_state_dict(net.state_dict(), strict=True)
    assert float(fresh.threshold) == pytest.approx(0.123)


def test_decoder_is_the_focus_decoder_for_nnunet_deep_supervision_switch():
    net = _net()
    assert net.decoder is net.focus.decoder


def test_select_tiles_refuses_nan():
    with pytest.raises(ValueError, match="NaN"):
        select_tiles(torch.tensor([0.2, float("nan")]), 0.5)
    assert select_tiles(torch.tensor([0.2, 0.6]), 0.5).tolist() == [False, True]


# ---------------------------------------------------------------------- mirror-invariant decisions (issue 10, item 2)
import itertools

from tests.toy_models import TiltedGlance


def _tilted_net(axes=(0, 1, 2)):
    return GFScreenNetwork(tiny_focus(), TiltedGlance(offset=0.0), num_classes=2, threshold=0.5,
                           glance_mirror_axes=axes).eval()


def _all_flips(ndim_spatial=3):
    dims = [d + 2 for d in range(ndim_spatial)]
    return [c for k in range(len(dims) + 1) for c in itertools.combinations(dims, k)]


def test_glance_logit_is_identical_for_every_flip_of_a_tile():
    x = torch.randn(4, 1, 16, 32, 32, generator=torch.Generator().manual_seed(3))
    x[:, :, :6, :10, :10] += 2.0  # off-centre bright corner: the tilted Glance's raw logit depends on the flip
    x += torch.tensor([-0.3, -0.05, 0.0, 0.3]).view(4, 1, 1, 1, 1)
    raw = _tilted_net(axes=())
    with torch.no_grad():
        raw_logits = [raw.glance_logits(torch.flip(x, f)) for f in _all_flips()]
    assert max(float((l - raw_logits[0]).abs().max()) for l in raw_logits) > 0.5  # the toy is not flip-invariant
    net = _tilted_net()
    with torch.no_grad():
        logits = [net.glance_logits(torch.flip(x, f)) for f in _all_flips()]
        flipped_decisions = [net._focus_on_selected(torch.flip(x, f), net.glance_probabilities(torch.flip(x, f)))
                             for f in _all_flips()]
    assert all(torch.equal(l, logits[0]) for l in logits)  # bitwise: same views, same summation order
    # the average is the mean of the raw logits of the 8 views
    torch.testing.assert_close(logits[0], torch.stack(raw_logits).mean(0))
    assert net.tiles_scored == 4 * 8 and net.tiles_selected % 8 == 0 and 0 < net.tiles_selected < 4 * 8
    # without the averaging some tile would be decided differently for different flips
    assert any(len({bool(l[i] > 0) for l in raw_logits}) == 2 for i in range(4))
    assert all((o.flatten(1).abs().sum(1) > 0).tolist() == (logits[0] > 0).tolist() for o in flipped_decisions)


def test_mirror_axes_are_saved_and_old_checkpoints_load_as_before():
    net = _tilted_net(axes=(1, 2))
    state = net.state_dict()
    assert state["glance_mirror_axes"].tolist() == [False, True, True]
    fresh = _tilted_net(axes=())
    fresh.load_state_dict(state, strict=True)
    assert fresh.glance_mirror_axes_tuple == (1, 2)
    x = torch.randn(2, 1, 16, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh.glance_logits(x), net.glance_logits(x))
    # a checkpoint written before the buffer existed: strict load, no averaging (one Glance pass, as calibrated)
    old = {k: v for k, v in state.items() if k != "glance_mirror_axes"}
    legacy = _tilted_net(axes=(0, 1, 2))
    legacy.load_state_dict(old, strict=True)
    assert legacy.glance_mirror_axes_tuple == ()
    with torch.no_grad():
        torch.testing.assert_close(legacy.glance_logits(x), legacy.glance(x).double(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="spatial axes"):
        legacy.set_glance_mirror_axes((3,))


# ---------------------------------------------------------------------- torch.compile (issue 10, item 1)
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
            before = net.tiles_selected
            out = compiled(x)
            n_compiled = net.tiles_selected - before
            torch.testing.assert_close(out, net(x), rtol=1e-5, atol=1e-5)
            assert net.tiles_selected - before == 2 * n_compiled  # the counters count the compiled call too
            selections.add((b, n_compiled))
            frames.append(counter.frame_count)
    assert len(selections) >= 7  # 0..b tiles selected out of b, for b = 1, 2, 3
    assert frames[-1] == frames[14] and frames[-1] <= 12  # bounded: nothing compiles after the first half
    assert counter.conv_graphs >= 1  # the Focus itself is compiled, not run eagerly
    torch._dynamo.reset()
