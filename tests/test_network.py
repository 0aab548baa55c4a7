import torch
from torch import nn

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
