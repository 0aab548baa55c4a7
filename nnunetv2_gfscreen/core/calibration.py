"""Gate threshold calibration on lesion coverage (docs/method.md, section 6).

Every sliding-window tile of every calibration (validation) case is scored by the Glance, the tiles padded
and cut exactly as the predictor does. For each candidate threshold the operating curve gives the selection
ratio, the voxel coverage (share of lesion voxels inside the union of the selected tiles), the lesion-level
sensitivity (share of 26-connected lesions with >= 90% of their voxels covered) and, for reference, tile
sensitivity/specificity (coverage.py has the maths). The default threshold is the highest one whose
lesion-level sensitivity reaches the target. A leave-one-case-out pass ('loco') fits the threshold on all
other cases for each case and reports that case's figures at it: the honest operating point. Storage:
calibration_store.py (checkpoint key `gfscreen_calibration`, `network_weights['threshold']`, and the fold's
gfscreen_calibration.json).
"""
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image

from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunetv2_gfscreen.core.coverage import (CONNECTIVITY, MIN_COVERED_FRACTION, CaseCoverage, case_coverage,
                                        leave_one_case_out, loco_margin, lower_by_logit, operating_curve, thin_curve,
                                        threshold_for_target)
from nnunetv2_gfscreen.core.network import GFScreenNetwork, autocast_on_cuda, unwrap_gfscreen_network
from nnunetv2_gfscreen.core.tiles import score_tiles, sliding_window_slicers

MAX_CURVE_POINTS = 2000


def score_cases(network: GFScreenNetwork, cases: Iterable[Tuple[torch.Tensor, np.ndarray]],
                patch_size: Sequence[int], tile_step_size: float = 0.5, batch_size: int = 8,
                device: torch.device = torch.device('cpu'), tile_margin: float = 0.0) -> List[CaseCoverage]:
    """Score every tile of every case and summarise its lesion coverage (`coverage.case_coverage`).

    cases: (data (C, *shape), seg (1, *shape) or (*shape)) pairs in preprocessed space; seg > 0 is lesion.
    Images are padded and tiled exactly as the predictor does.
    """
    if len(patch_size) != 3:
        raise NotImplementedError("calibration supports 3D configurations only")
    out: List[CaseCoverage] = []
    amp = autocast_on_cuda(device)
    for data, seg in cases:
        data = torch.as_tensor(np.asarray(data) if not isinstance(data, torch.Tensor) else data, dtype=torch.float32)
        seg = np.asarray(seg)
        seg = seg[None] if seg.ndim == 3 else seg
        if data.ndim != 4 or seg.shape[1:] != tuple(data.shape[1:]):
            raise ValueError(f"case {len(out)}: data must be (C, z, y, x) and seg (1, z, y, x) of the same spatial "
                             f"shape, got {tuple(data.shape)} and {seg.shape}")
        data = pad_nd_image(data, patch_size, 'constant', {'value': 0}, False, None)
        lesion = pad_nd_image(torch.from_numpy(seg > 0), patch_size, 'constant', {'value': False}, False, None)
        slicers = sliding_window_slicers(data.shape[1:], patch_size, tile_step_size)
        with amp:
            scores = score_tiles(network, data, slicers, batch_size, device).numpy()
        boxes = np.array([[[s.start, s.stop] for s in sl[1:]] for sl in slicers], dtype=np.int64)
        out.append(case_coverage(lesion[0].numpy(), boxes, scores, tile_margin))
    if not out:
        raise ValueError("calibration needs at least one case")
    return out


def score_and_label_tiles(network: GFScreenNetwork, cases: Iterable[Tuple[torch.Tensor, np.ndarray]],
                          patch_size: Sequence[int], tile_step_size: float = 0.5, batch_size: int = 8,
                          device: torch.device = torch.device('cpu')) -> Tuple[np.ndarray, np.ndarray, int]:
    """Glance scores (N,) float64 and lesion labels (N,) bool (tile holds a lesion voxel) of all tiles, and the
    number of cases (see `score_cases`)."""
    summaries = score_cases(network, cases, patch_size, tile_step_size, batch_size, device)
    return (np.concatenate([c.tile_scores for c in summaries]).astype(np.float64),
            np.concatenate([c.tile_labels for c in summaries]), len(summaries))


def calibration_from_cases(summaries: Sequence[CaseCoverage], target_sensitivity: float, previous_threshold: float,
                           case_ids: Optional[Sequence[str]] = None, tile_margin: float = 0.0,
                           max_curve_points: int = MAX_CURVE_POINTS) -> dict:
    """The calibration result (JSON-ready) from scored cases: operating curve, chosen threshold and 'loco'.

    The threshold is the highest reaching `target_sensitivity` lesion-level sensitivity on all the cases
    (`threshold_in_sample`), lowered by `loco_margin` (logit units) when leave-one-case-out shows that
    this rule misses held-out lesions; `previous_threshold` without lesions. The 'loco' figures are those
    of the plain rule (no margin): the honest estimate of what calibrating on so few cases gives."""
    if not 0 < target_sensitivity <= 1:
        raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
    curve = operating_curve(summaries)
    n_lesions = sum(c.n_lesions for c in summaries)
    notes = []
    if n_lesions:
        threshold = threshold_for_target(curve, target_sensitivity)
    else:
        threshold = previous_threshold
        notes.append(f"no lesions in {len(summaries)} case(s): kept the current threshold {previous_threshold}")
    point = {k: v[0] for k, v in operating_curve(summaries, [threshold]).items() if k != "threshold"}
    if n_lesions and point["lesion_sensitivity"] < target_sensitivity - 1e-12:
        notes.append(f"target not reached: with every tile selected lesion-level sensitivity is "
                     f"{point['lesion_sensitivity']:.4f} (tile_margin {tile_margin})")
    loco = leave_one_case_out(summaries, target_sensitivity, threshold, case_ids)
    margin = loco_margin(summaries, loco, target_sensitivity) if n_lesions else None
    threshold_in_sample = threshold
    if margin:
        threshold = lower_by_logit(threshold, margin)
        point = {k: v[0] for k, v in operating_curve(summaries, [threshold]).items() if k != "threshold"}
        notes.append(f"threshold lowered by {margin:.3g} logits from {threshold_in_sample:.10g}: the margin that "
                     f"leave-one-case-out needed to reach the target")
    if len(summaries) == 1:
        notes.append("one calibration case: its leave-one-case-out threshold is undefined, the all-cases threshold "
                     "is used for it")
    elif loco["n_fallback"]:
        names = [r["case"] for r in loco["cases"] if r["fallback"]]
        notes.append(f"no other case holds a lesion for {names}: the all-cases threshold (fitted on them too) is "
                     f"used for them, so their leave-one-case-out figures are not independent")
    return {
        "target_lesion_sensitivity": float(target_sensitivity), "threshold": float(threshold),
        "threshold_in_sample": float(threshold_in_sample), "loco_margin_logit": margin,
        "previous_threshold": float(previous_threshold), "note": "; ".join(notes) or None,
        "n_cases": len(summaries), "n_lesions": int(n_lesions),
        "lesion_voxels": int(sum(int(c.voxel_counts.sum()) for c in summaries)),
        "tiles_total": int(sum(len(c.tile_scores) for c in summaries)),
        "tiles_positive": int(sum(int(c.tile_labels.sum()) for c in summaries)),
        **point,
        "tile_margin": float(tile_margin), "min_covered_fraction": MIN_COVERED_FRACTION, "connectivity": CONNECTIVITY,
        "curve_points": len(curve["threshold"]),
        "curve": thin_curve(curve, [threshold], max_curve_points),
        "loco": loco,
    }


def calibrate_threshold(predictor_or_network: Union[nnUNetPredictor, torch.nn.Module],
                        cases: Iterable[Tuple[torch.Tensor, np.ndarray]], target_sensitivity: float = 0.98,
                        patch_size: Optional[Sequence[int]] = None, tile_step_size: Optional[float] = None,
                        batch_size: int = 8, device: Optional[torch.device] = None, tile_margin: float = 0.0,
                        case_ids: Optional[Sequence[str]] = None) -> dict:
    """Score all tiles of `cases` and calibrate (`calibration_from_cases`) for a lesion-level sensitivity target.

    With a predictor, patch size, step size and device come from it; with a bare network pass `patch_size`
    (step 0.5 and CPU unless given). The network is not modified. Returns a JSON-ready dict.
    """
    if isinstance(predictor_or_network, nnUNetPredictor):
        network = unwrap_gfscreen_network(predictor_or_network.network)
        patch_size = patch_size or predictor_or_network.configuration_manager.patch_size
        tile_step_size = tile_step_size or predictor_or_network.tile_step_size
        device = device or predictor_or_network.device
    else:
        network = unwrap_gfscreen_network(predictor_or_network)
        if patch_size is None:
            raise ValueError("calibrate_threshold with a bare network needs patch_size")
    tile_step_size = tile_step_size or 0.5
    device = device or torch.device('cpu')
    if not 0 < target_sensitivity <= 1:
        raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
    was_training = network.training
    network.to(device).eval()
    try:
        summaries = score_cases(network, cases, patch_size, tile_step_size, batch_size, device, tile_margin)
    finally:
        network.train(was_training)
    result = calibration_from_cases(summaries, target_sensitivity, float(network.threshold), case_ids, tile_margin)
    result.update(patch_size=[int(p) for p in patch_size], tile_step_size=float(tile_step_size))
    return result


def _fmt(v, digits=4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def describe_calibration(result: dict) -> str:
    """One paragraph: the chosen threshold's figures and the leave-one-case-out ones."""
    loco = result["loco"]
    margin = result.get("loco_margin_logit")
    return (f"threshold {result['threshold']:.10g} (target lesion-level sensitivity "
            f"{result['target_lesion_sensitivity']}, tile_margin {result['tile_margin']}): selection ratio "
            f"{_fmt(result['selection_ratio'])}, voxel coverage {_fmt(result['voxel_coverage'])}, lesion-level "
            f"sensitivity {_fmt(result['lesion_sensitivity'])} of {result['n_lesions']} lesion(s), tile sensitivity "
            f"{_fmt(result['tile_sensitivity'])}, on {result['tiles_total']} tiles of {result['n_cases']} case(s)"
            f"{'' if margin is None else f'; leave-one-case-out margin {margin:.3g} logits'}. "
            f"Leave-one-case-out (plain rule): selection ratio {_fmt(loco['selection_ratio'])}, voxel coverage "
            f"{_fmt(loco['voxel_coverage'])}, lesion-level sensitivity {_fmt(loco['lesion_sensitivity'])} "
            f"({loco['lesions_covered']}/{loco['lesions']}; {loco['n_fallback']} case(s) at the all-cases threshold)"
            + (f". Note: {result['note']}" if result['note'] else ""))


def preprocessed_cases(dataset, keys: Sequence[str]):
    for k in keys:
        data, seg, _, _ = dataset.load_case(k)
        yield torch.from_numpy(np.asarray(data[:], dtype=np.float32)), np.asarray(seg[:])
