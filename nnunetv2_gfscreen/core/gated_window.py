"""The Glance-gated sliding window, shared by GFScreenPredictor and the trainer's final validation.

`GatedSlidingWindowMixin` replaces nnU-Net's `_internal_predict_sliding_window_return_logits`: the Glance
scores every tile first (batched; `GFScreenNetwork.glance_logits`, averaged over the model's mirror axes, so
a tile's decision never depends on a flip), then the Focus segments only the selected tiles (batched), with
nnU-Net's Gaussian blending and mirroring TTA on those alone. Voxels that no selected tile covers get logits 0
(background after argmax), never 0/0. A fold ensemble gates once per case on the folds' mean Glance logit
and runs every fold's Focus on the same tiles (ensemble_gate.py).
It lives in core/ so that trainers/ (final validation) and predictors/ (nnUNetv2_predict_gfscreen) run
the same code without importing each other.
"""
import time
from typing import List, Optional, Tuple

import torch

from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from nnunetv2.utilities.helpers import empty_cache

from nnunetv2_gfscreen.core.ensemble_gate import pooled_threshold, score_tiles_over_folds
from nnunetv2_gfscreen.core.network import GFScreenNetwork, select_tiles, unwrap_gfscreen_network
from nnunetv2_gfscreen.core.records import Box, SlidingWindowRecord, selected_tiles_bbox  # noqa: F401 (re-export)
from nnunetv2_gfscreen.core.tiles import score_tiles

class GatedSlidingWindowMixin:
    """Mix into an `nnUNetPredictor` subclass (before it) to gate its sliding window.

    Attributes (set by `_init_gated_window`): threshold (None: the network's calibrated `threshold` buffer),
    dense (every tile to the Focus), tile_batch_size, glance_batch_size, and `records`, to which each sliding
    window appends a `SlidingWindowRecord` (one per fold for an ensemble); `reset_records()` clears it.
    """

    def _init_gated_window(self, threshold: Optional[float] = None, dense: bool = False, tile_batch_size: int = 4,
                           glance_batch_size: int = 8) -> None:
        self.threshold = threshold
        self.dense = dense
        self.tile_batch_size = tile_batch_size
        self.glance_batch_size = glance_batch_size
        self.records: List[SlidingWindowRecord] = []
        self._unpadded_shape: Optional[Tuple[int, ...]] = None
        self._case_gate: Optional[dict] = None  # the decision the folds of one case share (see _gate)

    @property
    def gfscreen_network(self) -> GFScreenNetwork:
        return unwrap_gfscreen_network(self.network)

    def reset_records(self) -> None:
        self.records = []

    def _clock(self) -> float:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @torch.inference_mode()
    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        """nnU-Net's fold loop (load each fold, sliding window, mean of the logits); the folds share one gate
        decision, made in the first fold's sliding window."""
        self._case_gate = {}
        try:
            return super().predict_logits_from_preprocessed_data(data)
        finally:
            self._case_gate = None

    def _gate(self, net: GFScreenNetwork, data: torch.Tensor, slicers) -> Tuple[torch.Tensor, torch.Tensor, float, float]:
        """(scores, selected, threshold, Glance seconds) of this sliding window. Within one case of a fold
        ensemble the first call decides for every fold (later folds and nnU-Net's CPU retry reuse it, with 0 s)."""
        if self._case_gate:
            g = self._case_gate
            return g['scores'], g['selected'], g['threshold'], 0.0
        ensemble = self._case_gate is not None and len(self.list_of_parameters) > 1
        t0 = self._clock()
        if ensemble:
            scores = score_tiles_over_folds(net, self.list_of_parameters, data, slicers, self.glance_batch_size,
                                            self.device)
            threshold = pooled_threshold([float(p['threshold']) for p in self.list_of_parameters]) \
                if self.threshold is None else float(self.threshold)
        else:
            scores = score_tiles(net, data, slicers, self.glance_batch_size, self.device)
            threshold = float(net.threshold) if self.threshold is None else float(self.threshold)
        glance_seconds = self._clock() - t0
        selected = torch.ones(len(slicers), dtype=torch.bool) if self.dense else select_tiles(scores, threshold)
        if self._case_gate is not None:
            self._case_gate.update(scores=scores, selected=selected, threshold=threshold)
        return scores, selected, threshold, glance_seconds

    @torch.inference_mode()
    def predict_sliding_window_return_logits(self, input_image: torch.Tensor) -> torch.Tensor:
        """nnU-Net's version (padding, autocast, OOM fallback); remembers the unpadded shape for the record."""
        self.gfscreen_network  # fail early with a clear error for non-GF-Screen models
        self._unpadded_shape = tuple(input_image.shape[1:])
        try:
            return super().predict_sliding_window_return_logits(input_image)
        finally:
            self._unpadded_shape = None

    @torch.inference_mode()
    def _internal_predict_sliding_window_return_logits(self, data: torch.Tensor, slicers, do_on_device: bool = True):
        """Gated replacement of nnU-Net's loop. data: (C, *padded shape); returns (K, *padded shape) float16 logits."""
        if len(self.configuration_manager.patch_size) != 3:
            raise NotImplementedError("GFScreenPredictor supports 3D configurations only (the Glance is a 3D network)")
        net = self.gfscreen_network
        results_device = self.device if do_on_device else torch.device('cpu')
        predicted_logits = n_predictions = None
        try:
            empty_cache(self.device)
            data = data.to(results_device)
            scores, selected, threshold, glance_seconds = self._gate(net, data, slicers)
            t1 = self._clock()

            predicted_logits = torch.zeros((self.label_manager.num_segmentation_heads, *data.shape[1:]),
                                           dtype=torch.half, device=results_device)
            n_predictions = torch.zeros(data.shape[1:], dtype=torch.half, device=results_device)
            gaussian = compute_gaussian(tuple(self.configuration_manager.patch_size), sigma_scale=1. / 8,
                                        value_scaling_factor=10, device=results_device) if self.use_gaussian else 1
            chosen = [s for s, keep in zip(slicers, selected.tolist()) if keep]
            with net.ungated():
                for start in range(0, len(chosen), self.tile_batch_size):
                    batch = chosen[start:start + self.tile_batch_size]
                    x = torch.stack([data[s] for s in batch]).to(self.device, non_blocking=True)
                    prediction = self._internal_maybe_mirror_and_predict(x).to(results_device)
                    # same operations and dtypes as nnU-Net's loop, tile by tile in slicer order
                    for tile_prediction, s in zip(prediction, batch):
                        if self.use_gaussian:
                            tile_prediction *= gaussian
                        predicted_logits[s] += tile_prediction
                        n_predictions[s[1:]] += gaussian
            # voxels no selected tile covers: logits stay 0 (background), divide by 1 instead of 0
            n_predictions.masked_fill_(n_predictions == 0, 1)
            torch.div(predicted_logits, n_predictions, out=predicted_logits)
            t2 = self._clock()
            if torch.any(torch.isinf(predicted_logits)):
                raise RuntimeError('Encountered inf in predicted array. Aborting... If this problem persists, '
                                   'reduce value_scaling_factor in compute_gaussian or increase the dtype of '
                                   'predicted_logits to fp32')
            self.records.append(self._make_record(data.shape[1:], slicers, scores, selected, threshold,
                                                  glance_seconds, t2 - t1))
            return predicted_logits
        except Exception:
            del predicted_logits, n_predictions
            empty_cache(self.device)
            empty_cache(results_device)
            raise

    def _make_record(self, padded_shape, slicers, scores, selected, threshold, glance_s, focus_s):
        unpadded = self._unpadded_shape or tuple(padded_shape)
        # pad_nd_image centres the content: the padding below is the floor of half the difference
        offset = [(p - u) // 2 for p, u in zip(padded_shape, unpadded)]
        bboxes = []
        for s in slicers:
            spatial = s[1:]
            bboxes.append([[int(min(max(sl.start - o, 0), u)), int(min(max(sl.stop - o, 0), u))]
                           for sl, o, u in zip(spatial, offset, unpadded)])
        return SlidingWindowRecord(image_shape=tuple(int(u) for u in unpadded), bboxes=bboxes,
                                   scores=[float(v) for v in scores], selected=[bool(v) for v in selected],
                                   threshold=threshold, dense=self.dense, glance_seconds=glance_s,
                                   focus_seconds=focus_s)


class GatedNnUNetPredictor(GatedSlidingWindowMixin, nnUNetPredictor):
    """nnU-Net's predictor with the gated sliding window and its constructor unchanged (the trainer's final
    validation builds it where nnU-Net builds `nnUNetPredictor`); gate options at their defaults."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_gated_window()
