"""The Glance-gated sliding window, shared by GFScreenPredictor and the trainer's final validation.

`GatedSlidingWindowMixin` replaces nnU-Net's sliding-window loop (`nnunet_adapters.PredictorHooks.sliding_window`): the Glance
scores every tile once (batched; `GFScreenNetwork.glance_logits`), the gate decides for the whole case
(core/gate.py: threshold, floor, fallback), then the Focus segments only the selected tiles (batched), with
nnU-Net's Gaussian blending and mirroring TTA on those alone. Voxels that no selected tile covers get logits 0
(background after argmax), never 0/0.

Border growth: a lesion that the Focus predicts up to the edge of the selected region may go on outside it (a
lesion cut by the selection's border). The unselected tiles that hold the voxels just outside such an edge are
then predicted too, repeated while the selection grows (`grow_selection`).

A fold ensemble gates once per case on the folds' mean Glance logit against the pooled rule and runs every
fold's Focus on the same tiles (ensemble_gate.py). It lives in core/ so that trainers/ (final validation) and
predictors/ (nnUNetv2_predict_gfscreen) run the same code without importing each other.
"""
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from nnunetv2.utilities.helpers import empty_cache

from nnunetv2_gfscreen.core.ensemble_gate import score_tiles_over_folds
from nnunetv2_gfscreen.core.gate import Gate, GateDecision, GateRule, decide, pool_rules
from nnunetv2_gfscreen.core.network import GFScreenNetwork, unwrap_gfscreen_network
from nnunetv2_gfscreen.core.records import SlidingWindowRecord
from nnunetv2_gfscreen.core.tiles import score_tile_logits
from nnunetv2_gfscreen.nnunet_adapters import PredictorHooks
from nnunetv2_gfscreen.plans.settings import GFScreenSettings


@dataclass
class _CaseGate:
    """The decision the folds of one case share."""
    scores: torch.Tensor
    decision: GateDecision
    rule: GateRule
    selected: torch.Tensor  # the decision, grown at the border by the first fold


def grow_selection(predicted_logits: torch.Tensor, n_predictions: torch.Tensor, boxes: torch.Tensor,
                   selected: torch.Tensor) -> torch.Tensor:
    """Unselected tiles to add: those holding a voxel just outside the predicted region's covered part where the
    Focus predicts lesion up to the edge of what the selected tiles cover.

    predicted_logits: (K, *shape) summed logits; n_predictions: (*shape) > 0 where a selected tile covers;
    boxes: (T, 3, 2) half-open tile boxes; selected: (T,) bool. Returns (T,) bool of tiles to add."""
    covered = n_predictions > 0
    foreground = (predicted_logits.argmax(0) > 0) & covered
    if not foreground.any():
        return torch.zeros_like(selected)
    grow = lambda m: F.max_pool3d(m[None, None].float(), 3, 1, 1)[0, 0] > 0  # noqa: E731 (26-neighbourhood)
    seeds = grow(foreground & grow(~covered)) & ~covered  # uncovered voxels next to lesion at the edge
    if not seeds.any():
        return torch.zeros_like(selected)
    points = torch.nonzero(seeds).to(boxes.device)  # (S, 3)
    add = torch.zeros(len(boxes), dtype=torch.bool)
    for chunk in torch.split(points, 4096):
        inside = (chunk[:, None, :] >= boxes[None, :, :, 0]) & (chunk[:, None, :] < boxes[None, :, :, 1])
        add |= inside.all(2).any(0).cpu()
    return add & ~selected.cpu()


class GatedSlidingWindowMixin:
    """Mix into a `nnunet_adapters.PredictorHooks` subclass (before it) to gate its sliding window.

    Attributes (set by `_init_gated_window`): threshold (a logit; None: the rule's calibrated one), rule (a
    GateRule replacing the network's for every case; None: the network's), dense (every tile to the Focus, no
    Glance pass unless `score_dense`), border_growth (None: the plans' `gate_border_growth`), tile_batch_size,
    glance_batch_size, and `records`, to which each sliding window appends a `SlidingWindowRecord` (one per
    fold for an ensemble).
    """

    def _init_gated_window(self, threshold: Optional[float] = None, dense: bool = False, tile_batch_size: int = 4,
                           glance_batch_size: int = 8, border_growth: Optional[bool] = None, score_dense: bool = False,
                           rule: Optional[GateRule] = None) -> None:
        self.threshold = threshold
        self.rule = rule
        self.dense = dense
        self.score_dense = score_dense
        self.border_growth = border_growth
        self.tile_batch_size = tile_batch_size
        self.glance_batch_size = glance_batch_size
        self.records: List[SlidingWindowRecord] = []
        self._unpadded_shape: Optional[Tuple[int, ...]] = None
        self._case_gate: Optional[dict] = None  # {} while a case runs: the decision its folds share (see _gate)

    @property
    def gfscreen_network(self) -> GFScreenNetwork:
        return unwrap_gfscreen_network(self.network)

    def reset_records(self) -> None:
        self.records = []

    def _clock(self) -> float:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def grows_at_border(self) -> bool:
        if self.border_growth is not None:
            return bool(self.border_growth)
        return bool(GFScreenSettings.from_configuration(self.configuration_manager.configuration).gate_border_growth)

    def case_rule(self, net: GFScreenNetwork, ensemble: bool) -> GateRule:
        """The rule this case is gated with: `rule`, else the loaded weights' (pooled over folds for an
        ensemble); `threshold` replaces its threshold."""
        if self.rule is not None:
            rule = self.rule
        elif ensemble:
            rule = pool_rules([Gate.rule_from_state_dict(p) for p in self.list_of_parameters])
        else:
            rule = net.gate.rule
        return rule if self.threshold is None else rule.with_threshold(self.threshold)

    @torch.inference_mode()
    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        """nnU-Net's fold loop (load each fold, sliding window, mean of the logits); the folds share one gate
        decision, made in the first fold's sliding window."""
        self._case_gate = {}
        try:
            return super().predict_logits_from_preprocessed_data(data)
        finally:
            self._case_gate = None

    def _gate(self, net: GFScreenNetwork, data: torch.Tensor, slicers) -> Tuple[Optional[_CaseGate], float, bool]:
        """(this case's gate or None when dense and unscored, Glance seconds, whether an earlier fold decided)."""
        if self._case_gate:
            return self._case_gate["gate"], 0.0, True
        if self.dense and not self.score_dense:
            return None, 0.0, False
        ensemble = self._case_gate is not None and len(self.list_of_parameters) > 1
        t0 = self._clock()
        if ensemble:
            scores = score_tiles_over_folds(net, self.list_of_parameters, data, slicers, self.glance_batch_size,
                                            self.device)
        else:
            scores = score_tile_logits(net, data, slicers, self.glance_batch_size, self.device)
        glance_seconds = self._clock() - t0
        rule = self.case_rule(net, ensemble)
        decision = decide(scores, rule)
        gate = _CaseGate(scores, decision, rule, decision.selected.clone())
        if self._case_gate is not None:
            self._case_gate["gate"] = gate
        return gate, glance_seconds, False

    @torch.inference_mode()
    def predict_sliding_window_return_logits(self, input_image: torch.Tensor) -> torch.Tensor:
        """nnU-Net's version (padding, autocast, OOM fallback); remembers the unpadded shape for the record."""
        self.gfscreen_network  # fail early with a clear error for non-GF-Screen models
        self._unpadded_shape = tuple(input_image.shape[1:])
        try:
            return super().predict_sliding_window_return_logits(input_image)
        finally:
            self._unpadded_shape = None

    def _predict_tiles(self, net, data, tiles, gaussian, predicted_logits, n_predictions, results_device) -> None:
        """The Focus (with nnU-Net's mirroring TTA) on `tiles`, batched, added into the accumulators."""
        with net.ungated():
            for start in range(0, len(tiles), self.tile_batch_size):
                batch = tiles[start:start + self.tile_batch_size]
                x = torch.stack([data[s] for s in batch]).to(self.device, non_blocking=True)
                prediction = self.mirror_and_predict(x).to(results_device)
                # same operations and dtypes as nnU-Net's loop, tile by tile in slicer order
                for tile_prediction, s in zip(prediction, batch):
                    if self.use_gaussian:
                        tile_prediction *= gaussian
                    predicted_logits[s] += tile_prediction
                    n_predictions[s[1:]] += gaussian

    @torch.inference_mode()
    def sliding_window(self, data: torch.Tensor, slicers, do_on_device: bool = True):
        """Gated replacement of nnU-Net's loop. data: (C, *padded shape); returns (K, *padded shape) float16 logits."""
        if len(self.configuration_manager.patch_size) != 3:
            raise NotImplementedError("GFScreenPredictor supports 3D configurations only (the Glance is a 3D network)")
        net = self.gfscreen_network
        results_device = self.device if do_on_device else torch.device('cpu')
        predicted_logits = n_predictions = None
        try:
            empty_cache(self.device)
            data = data.to(results_device)
            gate, glance_seconds, decided_before = self._gate(net, data, slicers)
            selected = torch.ones(len(slicers), dtype=torch.bool) if self.dense else gate.selected.clone()
            t1 = self._clock()
            predicted_logits = torch.zeros((self.label_manager.num_segmentation_heads, *data.shape[1:]),
                                           dtype=torch.half, device=results_device)
            n_predictions = torch.zeros(data.shape[1:], dtype=torch.half, device=results_device)
            gaussian = compute_gaussian(tuple(self.configuration_manager.patch_size), sigma_scale=1. / 8,
                                        value_scaling_factor=10, device=results_device) if self.use_gaussian else 1
            self._predict_tiles(net, data, [s for s, k in zip(slicers, selected.tolist()) if k], gaussian,
                                predicted_logits, n_predictions, results_device)
            grown = torch.zeros(len(slicers), dtype=torch.bool)
            if not self.dense and not decided_before and self.grows_at_border():
                boxes = torch.tensor([[[s.start, s.stop] for s in sl[1:]] for sl in slicers], dtype=torch.long)
                while True:
                    add = grow_selection(predicted_logits, n_predictions, boxes, selected)
                    if not add.any():
                        break
                    self._predict_tiles(net, data, [s for s, k in zip(slicers, add.tolist()) if k], gaussian,
                                        predicted_logits, n_predictions, results_device)
                    selected |= add
                    grown |= add
                gate.selected = selected.clone()
            elif decided_before and not self.dense:
                grown = gate.selected & ~gate.decision.selected
            # voxels no selected tile covers: logits stay 0 (background), divide by 1 instead of 0
            n_predictions.masked_fill_(n_predictions == 0, 1)
            torch.div(predicted_logits, n_predictions, out=predicted_logits)
            t2 = self._clock()
            if torch.any(torch.isinf(predicted_logits)):
                raise RuntimeError('Encountered inf in predicted array. Aborting... If this problem persists, '
                                   'reduce value_scaling_factor in compute_gaussian or increase the dtype of '
                                   'predicted_logits to fp32')
            self.records.append(self._make_record(data.shape[1:], slicers, gate, selected, grown,
                                                  glance_seconds, t2 - t1))
            return predicted_logits
        except Exception:
            del predicted_logits, n_predictions
            empty_cache(self.device)
            empty_cache(results_device)
            raise

    def _make_record(self, padded_shape, slicers, gate: Optional[_CaseGate], selected: torch.Tensor,
                     grown: torch.Tensor, glance_s: float, focus_s: float) -> SlidingWindowRecord:
        unpadded = self._unpadded_shape or tuple(padded_shape)
        # pad_nd_image centres the content: the padding below is the floor of half the difference
        offset = [(p - u) // 2 for p, u in zip(padded_shape, unpadded)]
        bboxes = []
        for s in slicers:
            spatial = s[1:]
            bboxes.append([[int(min(max(sl.start - o, 0), u)), int(min(max(sl.stop - o, 0), u))]
                           for sl, o, u in zip(spatial, offset, unpadded)])
        d = gate.decision if gate is not None else None
        return SlidingWindowRecord(
            image_shape=tuple(int(u) for u in unpadded), bboxes=bboxes,
            scores=[] if gate is None else [float(v) for v in gate.scores],
            selected=[bool(v) for v in selected], grown=[bool(v) for v in grown],
            threshold=float("nan") if gate is None else gate.rule.threshold,
            rule=None if gate is None else gate.rule.to_dict(),
            tiles_by_floor=0 if d is None else d.by_floor, fallback=False if d is None else d.fallback,
            tiles_by_fallback=0 if d is None else d.by_fallback,
            statistic=float("nan") if d is None else d.statistic,
            dense=self.dense, glance_seconds=glance_s, focus_seconds=focus_s)


class GatedNnUNetPredictor(GatedSlidingWindowMixin, PredictorHooks):
    """nnU-Net's predictor with the gated sliding window and its constructor unchanged (the trainer's final
    validation builds it where nnU-Net builds `nnUNetPredictor`); gate options at their defaults."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_gated_window()
