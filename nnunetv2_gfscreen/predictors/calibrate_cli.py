"""nnUNetv2_gfscreen_calibrate: (re)calibrate the gate of a trained model on cases it never trained on.

- `-f F`: fold F's validation cases, scored by fold F's Glance.
- `-f 0 1 2 3 4` (several folds of one cross-validation): each fold's validation cases scored by that fold's own
  Glance, pooled into one calibration (together the validation folds hold every training case once), written into
  every fold. A case in two folds' validation sets is refused (it would be scored by a fold that trained on it
  under some other split).
- `-cal_images DIR -cal_labels DIR`: calibration cases the user names (nnU-Net raw layout: `<case>_0000.nii.gz`
  and `<case>.nii.gz`), required for `-f all`, which trained on every case of the dataset. A named case that the
  model trained on is refused.
Settings (target, tile margin, floor, fallback tolerance, confidence) default to the model's plans.
"""
import argparse
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from nnunetv2_gfscreen.core.calibration import (CalibrationSettings, ScoredCase, calibration_record,
                                                describe_calibration, preprocessed_cases, score_cases)
from nnunetv2_gfscreen.core.calibration_store import CALIBRATION_FILE, CHECKPOINT_KEY, save_calibration
from nnunetv2_gfscreen.core.network import unwrap_gfscreen_network
from nnunetv2_gfscreen.plans.settings import GFScreenSettings
from nnunetv2_gfscreen.predictors.gfscreen_predictor import GFScreenPredictor


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_gfscreen_calibrate",
        description="Calibrate the GF-Screen gate of a trained model on cases it never trained on: the highest "
                    "threshold whose lesion-level sensitivity (share of lesions with >= 90%% of their voxels in "
                    "selected tiles) is certified at the target, or, with too few cases, every calibration lesion "
                    "covered and lowered by the leave-one-case-out margin. Stores the record and rule in the "
                    f"checkpoint (key {CHECKPOINT_KEY!r}) and a copy in {CALIBRATION_FILE}.")
    parser.add_argument('-d', type=str, required=True, help='Dataset name or ID')
    parser.add_argument('-c', type=str, required=True, help='Configuration, e.g. 3d_fullres')
    parser.add_argument('-tr', type=str, default='GFScreenTrainer', help='Trainer. Default: GFScreenTrainer')
    parser.add_argument('-p', type=str, default='nnUNetPlans', help='Plans identifier. Default: nnUNetPlans')
    parser.add_argument('-f', nargs='+', type=str, required=True,
                        help="Fold(s): one fold (its validation cases), several folds of a cross-validation (their "
                             "validation cases pooled, each scored by its own fold), or 'all' (needs -cal_images "
                             "and -cal_labels)")
    parser.add_argument('-chk', type=str, default='checkpoint_final.pth',
                        help='Checkpoint to calibrate (its rule is rewritten). Default: checkpoint_final.pth')
    parser.add_argument('-cal_images', type=str, default=None,
                        help='Folder of calibration images (<case>_0000.nii.gz, ...) the model never trained on')
    parser.add_argument('-cal_labels', type=str, default=None, help='Folder of their labels (<case>.nii.gz)')
    parser.add_argument('--target_sensitivity', type=float, default=None,
                        help='Lesion-level sensitivity target. Default: the plans\' target_lesion_sensitivity')
    parser.add_argument('--tile_margin', type=float, default=None,
                        help="Share of each tile side ignored at inner faces when counting coverage. Default: the "
                             "plans' calibration_tile_margin")
    parser.add_argument('--floor', type=float, default=None,
                        help="Share of each case's tiles always selected by Glance rank. Default: the plans' gate_floor")
    parser.add_argument('--fallback_tolerance', type=float, default=None,
                        help="Logits beyond the calibration cases' range of the baseline (10th-percentile) tile logit before a case is "
                             "gated densely (inf: never). Default: the plans' gate_fallback_tolerance")
    parser.add_argument('-step_size', type=float, default=0.5, help='Sliding-window step size. Default: 0.5')
    parser.add_argument('-device', type=str, default='cuda', help="'cuda', 'cpu' or 'mps'")
    return parser


def _settings(args, configuration: dict) -> CalibrationSettings:
    plans = GFScreenSettings.from_configuration(configuration)
    base = CalibrationSettings.from_gfscreen(plans)
    return CalibrationSettings(base.target if args.target_sensitivity is None else args.target_sensitivity,
                               base.tile_margin if args.tile_margin is None else args.tile_margin,
                               base.floor if args.floor is None else args.floor,
                               base.fallback_tolerance if args.fallback_tolerance is None else args.fallback_tolerance,
                               base.confidence)


def validation_keys(splits: List[dict], folds: Sequence[int], splits_file: str) -> Dict[int, List[str]]:
    """Each fold's validation cases; ValueError for a missing fold or a case in two folds' validation sets."""
    keys, seen = {}, {}
    for f in folds:
        if f >= len(splits):
            raise ValueError(f"fold {f} is not in {splits_file} ({len(splits)} splits)")
        keys[f] = list(splits[f]['val'])
        for k in keys[f]:
            if k in seen:
                raise ValueError(f"case {k} is in the validation cases of folds {seen[k]} and {f}: a pooled "
                                 f"calibration needs disjoint validation folds (one cross-validation)")
            seen[k] = f
    return keys


def named_cases(images: str, labels: str, file_ending: str) -> List[Tuple[str, List[str], str]]:
    """(case, image files, label file) of a folder pair in nnU-Net's raw layout."""
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder, \
        get_identifiers_from_splitted_dataset_folder
    for folder in (images, labels):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"calibration folder {folder} does not exist")
    ids = [str(i) for i in get_identifiers_from_splitted_dataset_folder(images, file_ending)]
    if not ids:
        raise ValueError(f"{images} holds no <case>_0000{file_ending} images")
    files = create_lists_from_splitted_dataset_folder(images, file_ending, ids)
    out = []
    for case, image_files in zip(ids, files):
        label = os.path.join(labels, case + file_ending)
        if not os.path.isfile(label):
            raise FileNotFoundError(f"no label {label} for calibration image {image_files[0]}")
        out.append((case, image_files, label))
    return out


def calibrate_entry_point() -> None:
    """nnUNetv2_gfscreen_calibrate."""
    from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json
    import nnunetv2.paths as paths
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    args = build_parser().parse_args()
    if args.device not in ('cpu', 'cuda', 'mps'):
        raise ValueError(f"-device must be cpu, cuda or mps, got {args.device!r}")
    folds = [f if f == 'all' else int(f) for f in args.f]
    named = args.cal_images is not None or args.cal_labels is not None
    if named and (args.cal_images is None or args.cal_labels is None):
        raise ValueError("give both -cal_images and -cal_labels")
    if 'all' in folds and not named:
        raise ValueError("fold 'all' trained on every case of the dataset, so none is left to calibrate on: give "
                         "cases it never saw with -cal_images and -cal_labels")
    if len(folds) > 1 and ('all' in folds or named):
        raise ValueError("several folds are calibrated on their pooled validation cases; 'all' and named "
                         "calibration cases go with one fold")
    model_folder = get_output_folder(args.d, args.tr, args.p, args.c)
    device = torch.device(args.device)
    predictors = {}
    for f in folds:
        predictor = GFScreenPredictor(tile_step_size=args.step_size, device=device, allow_tqdm=False)
        try:  # nnU-Net loads the fold's weights into the network the plans describe, strictly
            predictor.initialize_from_trained_model_folder(model_folder, [f], args.chk)
        except RuntimeError as e:
            raise ValueError(f"fold {f}'s checkpoint does not fit the network the model folder's plans describe "
                             f"(trained with other plans or GF-Screen settings?): {str(e).splitlines()[0]}") from e
        predictors[f] = predictor
    first = predictors[folds[0]]
    for f, p in predictors.items():
        if p.trainer_name != first.trainer_name or \
                {k: v.shape for k, v in p.list_of_parameters[0].items()} != \
                {k: v.shape for k, v in first.list_of_parameters[0].items()}:
            raise ValueError(f"fold {f} was trained differently from fold {folds[0]} (trainer {p.trainer_name} vs "
                             f"{first.trainer_name}, or another network): calibrate them one by one")
    settings = _settings(args, first.configuration_manager.configuration)
    cm = first.configuration_manager
    voxel_volume = float(np.prod(cm.spacing))
    dataset_name = maybe_convert_to_dataset_name(args.d)
    preprocessed_base = join(paths.nnUNet_preprocessed, dataset_name)
    scored: List[ScoredCase] = []
    if named:
        cases = named_cases(args.cal_images, args.cal_labels, first.dataset_json['file_ending'])
        trained_on = _training_cases(preprocessed_base, folds[0])
        clash = sorted(c for c, _, _ in cases if c in trained_on)
        if clash:
            raise ValueError(f"fold {folds[0]} trained on {clash[:5]}{'...' if len(clash) > 5 else ''}: calibration "
                             f"cases must be cases the model never saw")
        preprocessor = cm.preprocessor_class(verbose=False)
        pairs = ((torch.from_numpy(d), s) for d, s, _ in
                 (preprocessor.run_case(imgs, lab, first.plans_manager, cm, first.dataset_json)
                  for _, imgs, lab in cases))
        scored = _score(first, pairs, settings, args.step_size, device, voxel_volume, [c for c, _, _ in cases])
        source = f"named calibration cases ({args.cal_images})"
    else:
        splits_file = join(preprocessed_base, 'splits_final.json')
        if not isfile(splits_file):
            raise FileNotFoundError(f"{splits_file} not found: the folds' validation cases are unknown")
        keys = validation_keys(load_json(splits_file), folds, splits_file)
        data_folder = join(preprocessed_base, cm.data_identifier)
        dataset_class = infer_dataset_class(data_folder)
        for f in folds:
            dataset = dataset_class(data_folder, keys[f])
            ids = list(dataset.identifiers)
            scored += _score(predictors[f], preprocessed_cases(dataset, ids), settings, args.step_size, device,
                             voxel_volume, ids)
        source = f"validation cases of fold {folds[0]}" if len(folds) == 1 else \
            f"pooled validation cases of folds {' '.join(map(str, folds))}, each scored by its own fold"
    record = calibration_record(scored, settings, source, cm.patch_size, args.step_size)
    for f in folds:
        path = save_calibration(record, join(model_folder, f'fold_{f}'), args.chk)
        print(f"written to {path} and {args.chk} of fold {f} (key {CHECKPOINT_KEY!r})")
    print(describe_calibration(record))


def _score(predictor: GFScreenPredictor, cases, settings, step, device, voxel_volume, ids) -> List[ScoredCase]:
    net = unwrap_gfscreen_network(predictor.network)
    net.load_state_dict(predictor.list_of_parameters[0])
    net.to(device).eval()
    return score_cases(net, cases, predictor.configuration_manager.patch_size, settings, step, device=device,
                       voxel_volume=voxel_volume, case_ids=ids)


def _training_cases(preprocessed_base: str, fold) -> set:
    """The cases the model of `fold` trained on (all preprocessed cases for fold 'all')."""
    from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json
    splits_file = join(preprocessed_base, 'splits_final.json')
    if fold != 'all' and isfile(splits_file):
        splits = load_json(splits_file)
        return set(splits[fold]['train']) if fold < len(splits) else set()
    ids = set()
    if os.path.isdir(preprocessed_base):
        for sub in os.listdir(preprocessed_base):
            folder = join(preprocessed_base, sub)
            if os.path.isdir(folder):
                ids.update(f.split('.')[0] for f in os.listdir(folder) if f.endswith(('.pkl', '.b2nd', '.npz')))
    return ids
