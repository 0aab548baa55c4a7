"""Border growth (core/gated_window.py): a lesion the Focus predicts up to the edge of the selected tiles gets the
neighbouring tiles predicted too, until the selection holds it; nothing grows around a lesion inside it."""
import torch
from torch import nn

from nnunetv2_gfscreen.core.gate import GateRule
from nnunetv2_gfscreen.core.gated_window import grow_selection
from nnunetv2_gfscreen.core.network import GFScreenNetwork
from nnunetv2_gfscreen.core.tiles import sliding_window_slicers
from nnunetv2_gfscreen.predictors.gfscreen_predictor import GFScreenPredictor
from tests.toy_models import MeanIntensityGlance, init_predictor

PATCH = (8, 16, 16)
SHAPE = (8, 48, 48)  # one tile in z, 5 x 5 in-plane at step 0.5
CPU = torch.device("cpu")


class BrightFocus(nn.Module):
    """A Focus that segments exactly the voxels brighter than 1 (class-1 logit 10 * (x - 1))."""

    def forward(self, x):
        return torch.cat([torch.zeros_like(x), 10 * (x - 1.0)], dim=1)


def _predict(img, rule, growth):
    net = GFScreenNetwork(BrightFocus(), MeanIntensityGlance(0.0), 2, rule).eval()
    p = init_predictor(GFScreenPredictor(device=CPU, use_mirroring=False, allow_tqdm=False, border_growth=growth,
                                         rule=rule), net, PATCH)
    logits = p.predict_sliding_window_return_logits(img)
    return logits.argmax(0) > 0, p.records[-1]


def _image(block):
    img = torch.zeros((1, *SHAPE))
    img[(slice(None), *block)] = 2.0
    return img


def test_a_lesion_cut_by_the_selection_is_grown_until_it_is_whole():
    # a long bright lesion along x: the Glance selects only the one tile holding most of it (the floor's top 1)
    img = _image((slice(2, 6), slice(20, 28), slice(4, 44)))
    rule = GateRule(threshold=1e9, floor=1 / 25)
    lesion = img[0] > 1
    without, rec0 = _predict(img, rule, growth=False)
    assert rec0.tiles_selected == 1 and rec0.tiles_grown == 0
    assert 0 < (without & lesion).sum() < lesion.sum()  # cut by the selection's border
    grown, rec = _predict(img, rule, growth=True)
    assert torch.equal(grown, lesion)  # whole now, and nothing else
    assert rec.tiles_grown > 0 and rec.tiles_selected == 1 + rec.tiles_grown
    assert all(s for s, g in zip(rec.selected, rec.grown) if g)
    # only tiles that hold lesion were added
    slicers = sliding_window_slicers(SHAPE, PATCH, 0.5)
    assert all(bool(lesion[s[1:]].any()) for s, g in zip(slicers, rec.grown) if g)


def test_nothing_grows_around_a_lesion_inside_the_selection():
    img = _image((slice(2, 6), slice(14, 18), slice(14, 18)))  # inside the middle of tile (8..24, 8..24)
    rule = GateRule(threshold=1e9, floor=1 / 25)
    mask, rec = _predict(img, rule, growth=True)
    assert rec.tiles_grown == 0 and torch.equal(mask, img[0] > 1)


def test_grow_selection_by_hand():
    # two tiles along x; the left one is selected and its prediction reaches its right edge
    logits = torch.zeros((2, 1, 1, 8))
    logits[1, 0, 0, 2:4] = 5.0
    n = torch.zeros((1, 1, 8))
    n[..., :4] = 1
    boxes = torch.tensor([[[0, 1], [0, 1], [0, 4]], [[0, 1], [0, 1], [4, 8]]])
    assert grow_selection(logits, n, boxes, torch.tensor([True, False])).tolist() == [False, True]
    logits[1, 0, 0, 3] = -5.0  # the lesion stops one voxel before the edge: nothing to grow
    assert grow_selection(logits, n, boxes, torch.tensor([True, False])).tolist() == [False, False]
