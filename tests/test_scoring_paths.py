"""One score per tile on every path: GFScreenPredictor's gate, the calibration, the trainer's validation and the
stock nnUNetv2_predict path all score a tile with `GFScreenNetwork.glance_logits`, once, with a real Glance."""
import numpy as np
import pytest
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image

from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunetv2_gfscreen.core.calibration import CalibrationSettings, score_cases
from nnunetv2_gfscreen.core.gate import GateRule
from nnunetv2_gfscreen.core.glance import build_glance
from nnunetv2_gfscreen.core.network import GFScreenNetwork
from nnunetv2_gfscreen.core.tiles import sliding_window_slicers
from nnunetv2_gfscreen.predictors.gfscreen_predictor import GFScreenPredictor
from tests.toy_models import init_predictor, tiny_focus, toy_image

PATCH = (8, 32, 32)
SHAPE = (12, 56, 56)
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def _network():
    torch.manual_seed(4)
    glance = build_glance(1, PATCH, input_scale=0.5, base_features=4)
    return GFScreenNetwork(tiny_focus(), glance, 2).eval()


def test_every_path_scores_a_tile_the_same():
    net = _network()
    img = toy_image(SHAPE, (slice(2, 8), slice(10, 30), slice(30, 50)), seed=3)
    seg = np.zeros((1, *SHAPE), np.uint8)
    seg[0, 4:6, 15:20, 35:40] = 1
    # the calibration's scores of the case
    scored = score_cases(net, [(img, seg)], PATCH, CalibrationSettings(0.98, 0.25, 0.0, float("inf")))
    calibration_scores = torch.from_numpy(scored[0].coverage.tile_scores)
    # GFScreenPredictor's gate, with every tile to the Focus so that the threshold does not matter
    ours = init_predictor(GFScreenPredictor(device=CPU, use_mirroring=True, allow_tqdm=False, border_growth=False),
                          net, PATCH)
    ours.predict_sliding_window_return_logits(img)
    predictor_scores = torch.tensor(ours.records[-1].scores, dtype=torch.float64)
    assert torch.equal(predictor_scores, calibration_scores)  # one function, same batches
    # one tile at a time (the stock path's batch of 1, the trainer's validation patches): the same up to float
    # rounding of another batch size
    padded = pad_nd_image(img, PATCH, 'constant', {'value': 0}, False, None)
    slicers = sliding_window_slicers(padded.shape[1:], PATCH, 0.5)
    with torch.no_grad():
        single = torch.cat([net.glance_logits(padded[s][None]) for s in slicers])
    torch.testing.assert_close(single, calibration_scores, rtol=1e-5, atol=1e-5)
    # the stock path decides each tile (and its TTA copies) from that score
    threshold = float(calibration_scores.median())
    net.gate.set_rule(GateRule(threshold=threshold))
    decisions = []
    original = GFScreenNetwork._focus_on_selected
    GFScreenNetwork._focus_on_selected = lambda self, x, selected: decisions.append(bool(selected[0])) or \
        original(self, x, selected)
    try:
        init_predictor(nnUNetPredictor(device=CPU, use_mirroring=True, allow_tqdm=False), net, PATCH) \
            .predict_sliding_window_return_logits(img)
    finally:
        GFScreenNetwork._focus_on_selected = original
    per_tile = [set(decisions[i:i + 8]) for i in range(0, len(decisions), 8)]
    assert len(per_tile) == len(slicers) and all(len(d) == 1 for d in per_tile)
    clear = (calibration_scores - threshold).abs() > 1e-4
    stock = torch.tensor([d.pop() for d in per_tile])
    assert torch.equal(stock[clear], (calibration_scores > threshold)[clear]) and clear.sum() >= len(slicers) - 1
