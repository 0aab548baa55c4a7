"""Gate threshold calibration: pick the threshold from the Glance's tile scores on validation cases.

Every sliding-window tile of every validation case is scored by the Glance and labelled positive
if it contains any lesion voxel. The table threshold -> (tile sensitivity, selection ratio) is
stored with the model (`<fold folder>/gfscreen_calibration.json`, one entry per checkpoint file),
and the chosen threshold (the largest one whose tile sensitivity reaches the target) is written
into the checkpoint's `network_weights['threshold']`, where both predictors read it.
"""
import argparse
import itertools
import json
import os
from copy import deepcopy
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image

from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
from nnunetv2.utilities.helpers import dummy_context

from nnunetv2_gfscreen.network import GFScreenNetwork
from nnunetv2_gfscreen.predictors.gfscreen_predictor import score_tiles, unwrap_gfscreen_network

CALIBRATION_FILE = "gfscreen_calibration.json"
CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_best.pth")


def sliding_window_slicers(image_size: Sequence[int], patch_size: Sequence[int], tile_step_size: float) -> List[tuple]:
    """nnU-Net's 3D tiling (same steps and order as `nnUNetPredictor._internal_get_sliding_window_slicers`)."""
    steps = compute_steps_for_sliding_window(tuple(image_size), tuple(patch_size), tile_step_size)
    return [(slice(None), *[slice(s, s + p) for s, p in zip(start, patch_size)]) for start in itertools.product(*steps)]


def score_and_label_tiles(network: GFScreenNetwork, cases: Iterable[Tuple[torch.Tensor, np.ndarray]],
                          patch_size: Sequence[int], tile_step_size: float = 0.5, batch_size: int = 8,
                          device: torch.device = torch.device('cpu')) -> Tuple[np.ndarray, np.ndarray, int]:
    """Glance scores (N,) float32 and lesion labels (N,) bool of all tiles, and the number of cases.

    cases: (data (C, *shape), seg (1, *shape) or (*shape)) pairs in preprocessed space; seg > 0 is lesion.
    Images are padded and tiled exactly as the predictor does.
    """
    if len(patch_size) != 3:
        raise NotImplementedError("calibration supports 3D configurations only")
    all_scores, all_labels, n_cases = [], [], 0
    amp = torch.autocast(device.type, enabled=True) if device.type == 'cuda' else dummy_context()
    for data, seg in cases:
        data = torch.as_tensor(np.asarray(data) if not isinstance(data, torch.Tensor) else data, dtype=torch.float32)
        seg = np.asarray(seg)
        seg = seg[None] if seg.ndim == 3 else seg
        if data.ndim != 4 or seg.shape[1:] != tuple(data.shape[1:]):
            raise ValueError(f"case {n_cases}: data must be (C, z, y, x) and seg (1, z, y, x) of the same spatial "
                             f"shape, got {tuple(data.shape)} and {seg.shape}")
        data = pad_nd_image(data, patch_size, 'constant', {'value': 0}, False, None)
        lesion = pad_nd_image(torch.from_numpy(seg > 0), patch_size, 'constant', {'value': False}, False, None)
        slicers = sliding_window_slicers(data.shape[1:], patch_size, tile_step_size)
        with amp:
            all_scores.append(score_tiles(network, data, slicers, batch_size, device).numpy())
        all_labels.append(np.array([bool(lesion[s].any()) for s in slicers]))
        n_cases += 1
    if n_cases == 0:
        raise ValueError("calibration needs at least one case")
    return np.concatenate(all_scores).astype(np.float32), np.concatenate(all_labels), n_cases


def threshold_table(scores: np.ndarray, labels: np.ndarray) -> dict:
    """Candidate thresholds (ascending, float32) with tile sensitivity, specificity and selection ratio.

    A tile is selected if score > threshold (as `select_tiles`). Candidates sit between consecutive
    distinct scores (midpoints), below the lowest (everything selected) and at the highest
    (nothing selected). Sensitivity is None when there are no positive tiles (specificity: no negatives).
    """
    scores = np.asarray(scores, dtype=np.float32)
    labels = np.asarray(labels, dtype=bool)
    distinct = np.unique(scores)
    mids = ((distinct[:-1].astype(np.float64) + distinct[1:]) / 2).astype(np.float32)
    mids = np.where(mids < distinct[1:], mids, distinct[:-1])  # float32 rounding must not swallow the upper score
    low = np.nextafter(distinct[0], np.float32(-np.inf)) if distinct[0] <= 0 else np.float32(distinct[0] / 2)
    thresholds = np.concatenate([[low], mids, [distinct[-1]]]).astype(np.float32)
    n, n_pos = len(scores), int(labels.sum())
    n_neg = n - n_pos
    sorted_all, sorted_pos = np.sort(scores), np.sort(scores[labels])
    sorted_neg = np.sort(scores[~labels])
    n_sel = n - np.searchsorted(sorted_all, thresholds, side='right')
    tp = n_pos - np.searchsorted(sorted_pos, thresholds, side='right')
    fp = n_neg - np.searchsorted(sorted_neg, thresholds, side='right')
    return {
        "threshold": [float(t) for t in thresholds],
        "tile_sensitivity": [float(v) / n_pos for v in tp] if n_pos else [None] * len(thresholds),
        "tile_specificity": [1 - float(v) / n_neg for v in fp] if n_neg else [None] * len(thresholds),
        "selection_ratio": [float(v) / n for v in n_sel],
    }


def threshold_for_sensitivity(table: dict, target_sensitivity: float) -> float:
    """The largest table threshold whose tile sensitivity is >= target (sensitivity falls as the threshold rises)."""
    if not 0 < target_sensitivity <= 1:
        raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
    sens = table["tile_sensitivity"]
    if not sens or sens[0] is None:
        raise ValueError("the calibration table has no positive (lesion) tiles, so no threshold can be chosen "
                         "for a target sensitivity")
    ok = [i for i, s in enumerate(sens) if s >= target_sensitivity - 1e-12]
    return table["threshold"][max(ok)]


def calibrate_threshold(predictor_or_network: Union[nnUNetPredictor, torch.nn.Module],
                        cases: Iterable[Tuple[torch.Tensor, np.ndarray]], target_sensitivity: float = 0.98,
                        patch_size: Optional[Sequence[int]] = None, tile_step_size: Optional[float] = None,
                        batch_size: int = 8, device: Optional[torch.device] = None) -> dict:
    """Score all tiles of `cases`, build the threshold table and choose the default threshold.

    With a predictor, patch size, step size and device come from it; with a bare network pass
    `patch_size` (step 0.5 and CPU unless given). Without positive tiles the network's current
    threshold is kept and `note` says so. The network is not modified.
    Returns a JSON-ready dict (see `save_calibration`).
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
        scores, labels, n_cases = score_and_label_tiles(network, cases, patch_size, tile_step_size, batch_size, device)
    finally:
        network.train(was_training)
    table = threshold_table(scores, labels)
    previous = float(network.threshold)
    n_pos = int(labels.sum())
    if n_pos:
        threshold, note = threshold_for_sensitivity(table, target_sensitivity), None
    else:
        threshold = previous
        note = f"no positive tiles in {n_cases} case(s): kept the current threshold {previous}"
    selected = scores > np.float32(threshold)
    return {
        "target_sensitivity": float(target_sensitivity),
        "threshold": float(threshold),
        "previous_threshold": previous,
        "note": note,
        "n_cases": n_cases,
        "tiles_total": int(len(scores)),
        "tiles_positive": n_pos,
        "tile_sensitivity": float(selected[labels].mean()) if n_pos else None,
        "selection_ratio": float(selected.mean()),
        "patch_size": [int(p) for p in patch_size],
        "tile_step_size": float(tile_step_size),
        "table": table,
    }


# ---------------------------------------------------------------------- storage
def _atomic_json(obj: dict, path: str) -> None:
    tmp = path + f".partial{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def load_calibration(fold_folder: str, checkpoint_name: str = "checkpoint_final.pth") -> dict:
    """The calibration entry of `checkpoint_name` in `<fold_folder>/gfscreen_calibration.json`."""
    path = os.path.join(fold_folder, CALIBRATION_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GF-Screen calibration at {path}; run nnUNetv2_gfscreen_calibrate for this fold")
    with open(path) as f:
        stored = json.load(f)
    if checkpoint_name not in stored.get("checkpoints", {}):
        raise KeyError(f"{path} has no calibration for {checkpoint_name} (it has {sorted(stored.get('checkpoints', {}))})")
    return stored["checkpoints"][checkpoint_name]


def write_threshold_into_checkpoint(checkpoint_file: str, threshold: float) -> None:
    """Set `network_weights['threshold']` of a checkpoint file, replacing the file atomically."""
    checkpoint = torch.load(checkpoint_file, map_location='cpu', weights_only=False)
    weights = checkpoint.get('network_weights', {})
    if 'threshold' not in weights:
        raise KeyError(f"{checkpoint_file} has no network_weights['threshold']: not a GFScreenNetwork checkpoint")
    weights['threshold'] = torch.tensor(float(threshold), dtype=weights['threshold'].dtype)
    tmp = checkpoint_file + f".partial{os.getpid()}"
    torch.save(checkpoint, tmp)
    os.replace(tmp, checkpoint_file)


def save_calibration(result: dict, fold_folder: str, checkpoint_name: str = "checkpoint_final.pth") -> str:
    """Store `result` for `checkpoint_name` in the fold's calibration JSON and write its threshold into that
    checkpoint (if the file exists). Returns the JSON path."""
    path = os.path.join(fold_folder, CALIBRATION_FILE)
    stored = {"checkpoints": {}}
    if os.path.isfile(path):
        with open(path) as f:
            stored = json.load(f)
    stored.setdefault("checkpoints", {})[checkpoint_name] = result
    checkpoint_file = os.path.join(fold_folder, checkpoint_name)
    if os.path.isfile(checkpoint_file):
        write_threshold_into_checkpoint(checkpoint_file, result["threshold"])
    _atomic_json(stored, path)
    return path


def _preprocessed_cases(dataset, keys: Sequence[str]):
    for k in keys:
        data, seg, _, _ = dataset.load_case(k)
        yield torch.from_numpy(np.asarray(data[:], dtype=np.float32)), np.asarray(seg[:])


def calibrate_trainer(trainer, target_sensitivity: Optional[float] = None) -> dict:
    """Calibrate a trained GFScreenTrainer's gate on its validation cases (call before the final validation).

    The live network (the final weights) is calibrated, its `threshold` buffer set, and the result
    stored for checkpoint_final.pth; a checkpoint_best.pth in the output folder gets its own
    calibration (its Glance differs). Returns the result for the final weights.
    """
    target = trainer.gfscreen.target_tile_sensitivity if target_sensitivity is None else target_sensitivity
    network = unwrap_gfscreen_network(trainer.network)
    _, val_keys = trainer.do_split()
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, list(val_keys),
                                    folder_with_segs_from_previous_stage=trainer.folder_with_segs_from_previous_stage)
    patch_size = trainer.configuration_manager.patch_size
    result = calibrate_threshold(network, _preprocessed_cases(dataset, dataset.identifiers), target, patch_size,
                                 device=trainer.device)
    network.threshold.fill_(result["threshold"])
    save_calibration(result, trainer.output_folder, "checkpoint_final.pth")
    trainer.print_to_log_file(f"GF-Screen calibration: threshold {result['threshold']:.6g} (tile sensitivity "
                              f"{result['tile_sensitivity']}, selection ratio {result['selection_ratio']:.4f}, "
                              f"target {target}){'; ' + result['note'] if result['note'] else ''}")
    best_file = os.path.join(trainer.output_folder, "checkpoint_best.pth")
    if os.path.isfile(best_file):
        best = deepcopy(network)
        best.load_state_dict(torch.load(best_file, map_location='cpu', weights_only=False)['network_weights'])
        best_result = calibrate_threshold(best, _preprocessed_cases(dataset, dataset.identifiers), target,
                                          patch_size, device=trainer.device)
        save_calibration(best_result, trainer.output_folder, "checkpoint_best.pth")
        del best
    return result


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
                                                 "validation cases (tile sensitivity target).")
    parser.add_argument('-d', type=str, required=True, help='Dataset name or ID')
    parser.add_argument('-c', type=str, required=True, help='Configuration, e.g. 3d_fullres')
    parser.add_argument('-tr', type=str, required=False, default='GFScreenTrainer', help='Trainer. Default: GFScreenTrainer')
    parser.add_argument('-p', type=str, required=False, default='nnUNetPlans', help='Plans identifier. Default: nnUNetPlans')
    parser.add_argument('-f', type=str, required=True, help='Fold (0-4 or all)')
    parser.add_argument('-chk', type=str, required=False, default='checkpoint_final.pth',
                        help='Checkpoint to calibrate (its threshold is rewritten). Default: checkpoint_final.pth')
    parser.add_argument('--target_sensitivity', type=float, required=False, default=0.98,
                        help='Tile sensitivity the chosen threshold must reach on the validation tiles. Default: 0.98')
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
    result = calibrate_threshold(predictor, _preprocessed_cases(dataset, dataset.identifiers), args.target_sensitivity)
    path = save_calibration(result, join(model_folder, f'fold_{fold}'), args.chk)
    print(f"threshold {result['threshold']:.6g}: tile sensitivity {result['tile_sensitivity']}, selection ratio "
          f"{result['selection_ratio']:.4f} on {result['tiles_total']} tiles of {result['n_cases']} case(s)"
          f"{'; ' + result['note'] if result['note'] else ''}\nwritten to {path} and {args.chk}")
