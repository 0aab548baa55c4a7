"""Gate threshold calibration on lesion coverage (METHOD.md, "Gate calibration").

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
import argparse
import itertools
import os
from contextlib import contextmanager
from copy import deepcopy
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image

from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
from nnunetv2.utilities.helpers import dummy_context

from nnunetv2_gfscreen.coverage import (CONNECTIVITY, MIN_COVERED_FRACTION, CaseCoverage, case_coverage,
                                        leave_one_case_out, loco_margin, lower_by_logit, operating_curve, thin_curve,
                                        threshold_for_target)
from nnunetv2_gfscreen.network import GFScreenNetwork
from nnunetv2_gfscreen.predictors.calibration_store import (CALIBRATION_FILE, CHECKPOINT_KEY, CHECKPOINTS,  # noqa: F401
                                                            load_calibration, save_calibration,
                                                            write_threshold_into_checkpoint)
from nnunetv2_gfscreen.predictors.gfscreen_predictor import score_tiles, unwrap_gfscreen_network

MAX_CURVE_POINTS = 2000


def sliding_window_slicers(image_size: Sequence[int], patch_size: Sequence[int], tile_step_size: float) -> List[tuple]:
    """nnU-Net's 3D tiling (same steps and order as `nnUNetPredictor._internal_get_sliding_window_slicers`)."""
    steps = compute_steps_for_sliding_window(tuple(image_size), tuple(patch_size), tile_step_size)
    return [(slice(None), *[slice(s, s + p) for s, p in zip(start, patch_size)]) for start in itertools.product(*steps)]


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
    amp = torch.autocast(device.type, enabled=True) if device.type == 'cuda' else dummy_context()
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


def _preprocessed_cases(dataset, keys: Sequence[str]):
    for k in keys:
        data, seg, _, _ = dataset.load_case(k)
        yield torch.from_numpy(np.asarray(data[:], dtype=np.float32)), np.asarray(seg[:])


def calibrate_trainer(trainer, target_sensitivity: Optional[float] = None, tile_margin: Optional[float] = None) -> dict:
    """Calibrate a trained GFScreenTrainer's gate on its validation cases (call before the final validation).

    The live network (the final weights) is calibrated, its `threshold` buffer set (all-cases threshold), and
    the result stored for checkpoint_final.pth; a checkpoint_best.pth in the output folder gets its own
    calibration (its Glance differs). Returns the result for the final weights.
    """
    target = trainer.gfscreen.target_lesion_sensitivity if target_sensitivity is None else target_sensitivity
    tile_margin = trainer.gfscreen.calibration_tile_margin if tile_margin is None else tile_margin
    network = unwrap_gfscreen_network(trainer.network)
    _, val_keys = trainer.do_split()
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, list(val_keys),
                                    folder_with_segs_from_previous_stage=trainer.folder_with_segs_from_previous_stage)
    keys = list(dataset.identifiers)
    patch_size = trainer.configuration_manager.patch_size
    result = calibrate_threshold(network, _preprocessed_cases(dataset, keys), target, patch_size,
                                 device=trainer.device, tile_margin=tile_margin, case_ids=keys)
    network.threshold.fill_(result["threshold"])
    save_calibration(result, trainer.output_folder, "checkpoint_final.pth")
    trainer.print_to_log_file(f"GF-Screen calibration: {describe_calibration(result)}")
    best_file = os.path.join(trainer.output_folder, "checkpoint_best.pth")
    if not os.path.isfile(best_file):
        return result
    best = deepcopy(network)
    best.load_state_dict(torch.load(best_file, map_location='cpu', weights_only=False)['network_weights'])
    best_result = calibrate_threshold(best, _preprocessed_cases(dataset, keys), target, patch_size,
                                      device=trainer.device, tile_margin=tile_margin, case_ids=keys)
    save_calibration(best_result, trainer.output_folder, "checkpoint_best.pth")
    return result


@contextmanager
def loco_thresholds_during_validation(trainer, result: dict):
    """While active, loading validation case k through `trainer.dataset_class` sets the network's threshold to
    k's leave-one-case-out threshold (nnU-Net's final validation predicts each case right after loading it).
    On exit the dataset class and the all-cases threshold are restored."""
    network = unwrap_gfscreen_network(trainer.network)
    all_cases = float(result["threshold"])
    per_case = {r["case"]: r["threshold"] for r in result["loco"]["cases"]}
    base = trainer.dataset_class

    def load_case(self, identifier):
        loaded = base.load_case(self, identifier)
        network.threshold.fill_(per_case.get(identifier, all_cases))
        return loaded

    trainer.dataset_class = type(f"LOCOThreshold{base.__name__}", (base,), {"load_case": load_case})
    trainer.print_to_log_file("GF-Screen: the final validation predicts each case at its leave-one-case-out "
                              "threshold: " + ", ".join(f"{k} {t:.6g}" for k, t in per_case.items()))
    try:
        yield per_case
    finally:
        trainer.dataset_class = base
        network.threshold.fill_(all_cases)


# ---------------------------------------------------------------------- command
def calibrate_entry_point() -> None:
    """nnUNetv2_gfscreen_calibrate: calibrate the gate threshold of a trained model folder's fold."""
    from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json
    import nnunetv2.paths as paths
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import get_output_folder
    from nnunetv2_gfscreen.predictors.gfscreen_predictor import GFScreenPredictor

    parser = argparse.ArgumentParser(description="Calibrate the GF-Screen gate threshold of a trained fold on its "
                                                 "validation cases: the highest threshold whose lesion-level "
                                                 "sensitivity (share of lesions with >= 90% of their voxels inside "
                                                 "the selected tiles) reaches the target. Stores the operating curve "
                                                 "and leave-one-case-out figures in the checkpoint and in "
                                                 f"{CALIBRATION_FILE}.")
    parser.add_argument('-d', type=str, required=True, help='Dataset name or ID')
    parser.add_argument('-c', type=str, required=True, help='Configuration, e.g. 3d_fullres')
    parser.add_argument('-tr', type=str, required=False, default='GFScreenTrainer', help='Trainer. Default: GFScreenTrainer')
    parser.add_argument('-p', type=str, required=False, default='nnUNetPlans', help='Plans identifier. Default: nnUNetPlans')
    parser.add_argument('-f', type=str, required=True, help='Fold (0-4 or all)')
    parser.add_argument('-chk', type=str, required=False, default='checkpoint_final.pth',
                        help='Checkpoint to calibrate (its threshold is rewritten). Default: checkpoint_final.pth')
    parser.add_argument('--target_sensitivity', type=float, required=False, default=0.98,
                        help='Lesion-level sensitivity the chosen threshold must reach on the validation cases '
                             '(share of 26-connected lesions with >= 90%% of their voxels in selected tiles). '
                             'Default: 0.98')
    parser.add_argument('--tile_margin', type=float, required=False, default=0.25,
                        help='Fraction of each tile side ignored at each face when counting coverage (coverage by '
                             'the tiles\' central regions; faces on the image border are kept). 0.25: a lesion must '
                             'lie in the middle half of selected tiles, where the Focus sees it with context '
                             '(docs/results.md: at 0 the gated DSC fell 1.8 points below dense). Default: 0.25')
    parser.add_argument('-step_size', type=float, required=False, default=0.5,
                        help='Sliding-window step size used at inference. Default: 0.5')
    parser.add_argument('-device', type=str, default='cuda', required=False, help="'cuda', 'cpu' or 'mps'")
    args = parser.parse_args()
    if args.device not in ('cpu', 'cuda', 'mps'):
        raise ValueError(f"-device must be cpu, cuda or mps, got {args.device!r}")
    fold = args.f if args.f == 'all' else int(args.f)

    model_folder = get_output_folder(args.d, args.tr, args.p, args.c)
    predictor = GFScreenPredictor(tile_step_size=args.step_size, device=torch.device(args.device), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, [fold], args.chk)
    dataset_name = maybe_convert_to_dataset_name(args.d)
    preprocessed_base = join(paths.nnUNet_preprocessed, dataset_name)
    data_folder = join(preprocessed_base, predictor.configuration_manager.data_identifier)
    dataset_class = infer_dataset_class(data_folder)
    if fold == 'all':
        keys = dataset_class.get_identifiers(data_folder)
    else:
        splits_file = join(preprocessed_base, 'splits_final.json')
        if not isfile(splits_file):
            raise FileNotFoundError(f"{splits_file} not found: the fold's validation cases are unknown")
        splits = load_json(splits_file)
        if fold >= len(splits):
            raise ValueError(f"fold {fold} is not in {splits_file} ({len(splits)} splits)")
        keys = splits[fold]['val']
    dataset = dataset_class(data_folder, list(keys))
    ids = list(dataset.identifiers)
    result = calibrate_threshold(predictor, _preprocessed_cases(dataset, ids), args.target_sensitivity,
                                 tile_margin=args.tile_margin, case_ids=ids)
    path = save_calibration(result, join(model_folder, f'fold_{fold}'), args.chk)
    print(f"{describe_calibration(result)}\nwritten to {path} and {args.chk} (key {CHECKPOINT_KEY!r})")
