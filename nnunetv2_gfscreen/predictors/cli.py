"""nnUNetv2_predict_gfscreen: nnUNetv2_predict's arguments plus Glance gating options and per-case reports.

Cases run one after another in this process (read -> preprocess -> gated sliding window -> export
-> report), so the per-case timings in the reports are honest; -npp/-nps are accepted for
compatibility (-nps sets the torch threads of the export). A case with bad input (unreadable,
wrong channel count, NaN/inf) writes nothing; the other cases are still predicted and the command
fails at the end naming every bad case.
"""
import argparse
import inspect
import multiprocessing
import os
import time
from copy import deepcopy
from typing import List, Optional

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import isdir, join, maybe_mkdir_p, save_json

from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from nnunetv2.utilities.file_path_utilities import get_output_folder
from nnunetv2.utilities.helpers import empty_cache
from nnunetv2.utilities.json_export import recursive_fix_for_json_export

from nnunetv2_gfscreen.predictors.calibration import load_calibration, threshold_for_sensitivity
from nnunetv2_gfscreen.predictors.gfscreen_predictor import CaseInputError, GFScreenPredictor
from nnunetv2_gfscreen.predictors.report import build_case_report, lesion_components, save_case_png, \
    write_case_report


def predict_folder(predictor: GFScreenPredictor, input_folder: str, output_folder: str,
                   report_dir: Optional[str] = None, png: bool = False, save_probabilities: bool = False,
                   overwrite: bool = True, num_parts: int = 1, part_id: int = 0,
                   num_threads_export: int = 1) -> List[dict]:
    """Predict every case of `input_folder` into `output_folder` with one JSON report (and PNG) per case.

    Returns the reports. Raises FileNotFoundError/ValueError for a missing or empty input folder and
    CaseInputError (after all good cases are done) if any case had bad input.
    """
    if not isdir(input_folder):
        raise FileNotFoundError(f"input folder {input_folder} does not exist")
    if predictor.configuration_manager.previous_stage_name is not None:
        raise NotImplementedError("GF-Screen does not support cascaded configurations")
    ending = predictor.dataset_json['file_ending']
    if not any(f.endswith(ending) for f in os.listdir(input_folder)):
        raise ValueError(f"input folder {input_folder} has no images ending in {ending!r} "
                         f"(expected <case>_0000{ending}, ...)")
    report_dir = report_dir or join(output_folder, 'gfscreen_reports')
    maybe_mkdir_p(output_folder)

    args = {k: v for k, v in locals().items() if k in inspect.signature(predict_folder).parameters and k != 'predictor'}
    args.update(threshold=predictor.threshold, dense=predictor.dense, tile_batch_size=predictor.tile_batch_size)
    args = deepcopy(args)
    recursive_fix_for_json_export(args)
    save_json(args, join(output_folder, 'predict_from_raw_data_args.json'))
    save_json(predictor.dataset_json, join(output_folder, 'dataset.json'), sort_keys=False)
    save_json(predictor.plans_manager.plans, join(output_folder, 'plans.json'), sort_keys=False)

    lists, truncated, _ = predictor._manage_input_and_output_lists(input_folder, output_folder, None, overwrite,
                                                                    part_id, num_parts, save_probabilities)
    reports, failures = [], []
    for files, out_truncated in zip(lists, truncated):
        case = os.path.basename(out_truncated)
        try:
            reports.append(predict_case(predictor, files, out_truncated, report_dir, png, save_probabilities,
                                        num_threads_export))
        except CaseInputError as e:
            print(f"SKIPPED {e}")
            failures.append(str(e))
        print(f"done with {case}")
    compute_gaussian.cache_clear()
    empty_cache(predictor.device)
    if failures:
        raise CaseInputError(f"{len(failures)} case(s) could not be predicted (no output written for them):\n  "
                             + "\n  ".join(failures))
    return reports


def predict_case(predictor: GFScreenPredictor, image_files: List[str], output_file_truncated: str,
                 report_dir: str, png: bool = False, save_probabilities: bool = False,
                 num_threads_export: int = 1) -> dict:
    """One case end to end; the report is written after the mask. total_seconds = read .. mask written."""
    case = os.path.basename(output_file_truncated)
    t0 = time.perf_counter()
    data, properties = predictor.preprocess_case(image_files, case)
    predictor.reset_records()
    logits = predictor.predict_logits_from_preprocessed_data(data).cpu()
    mask_file = predictor.export_case(logits, properties, output_file_truncated, save_probabilities,
                                      num_threads_export)
    total = time.perf_counter() - t0
    rw = predictor.plans_manager.image_reader_writer_class()
    mask, mask_props = rw.read_seg(mask_file)
    lesions = lesion_components(mask[0], mask_props['spacing'])
    report = build_case_report(case, predictor.records, properties, predictor.plans_manager.transpose_backward,
                               lesions, total)
    write_case_report(report, report_dir)
    if png:
        image, _ = rw.read_images(image_files)
        save_case_png(np.asarray(image[0]), mask[0], report, join(report_dir, f"{case}.png"))
    return report


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='nnU-Net inference with GF-Screen Glance gating: the Focus network only '
                                            'segments the tiles the Glance selects. Takes every argument of '
                                            'nnUNetv2_predict, plus the gating options at the end.')
    p.add_argument('-i', type=str, required=True,
                   help='Input folder with <case>_XXXX<file ending> images (channel numbering as in training).')
    p.add_argument('-o', type=str, required=True, help='Output folder (created if missing); masks are <case><file ending>.')
    p.add_argument('-d', type=str, required=True, help='Dataset name or ID to predict with.')
    p.add_argument('-p', type=str, required=False, default='nnUNetPlans', help='Plans identifier. Default: nnUNetPlans')
    p.add_argument('-tr', type=str, required=False, default='GFScreenTrainer',
                   help='Trainer used for training. Default: GFScreenTrainer')
    p.add_argument('-c', type=str, required=True, help='Configuration, e.g. 3d_fullres.')
    p.add_argument('-f', nargs='+', type=str, required=False, default=(0, 1, 2, 3, 4),
                   help='Folds to ensemble. Default: (0, 1, 2, 3, 4)')
    p.add_argument('-step_size', type=float, required=False, default=0.5,
                   help='Sliding-window step size as a fraction of the patch size (<= 1). Default: 0.5')
    p.add_argument('--disable_tta', action='store_true', required=False, default=False,
                   help='Disable mirroring test-time augmentation (of the selected tiles).')
    p.add_argument('--verbose', action='store_true', help='Print more.')
    p.add_argument('--save_probabilities', action='store_true',
                   help='Also write class probabilities (.npz/.pkl). Unselected voxels get uniform probabilities.')
    p.add_argument('--continue_prediction', action='store_true',
                   help='Skip cases whose output already exists.')
    p.add_argument('-chk', type=str, required=False, default='checkpoint_final.pth',
                   help='Checkpoint file name. Default: checkpoint_final.pth')
    p.add_argument('-npp', type=int, required=False, default=3,
                   help='Accepted for compatibility with nnUNetv2_predict; cases are preprocessed in this process.')
    p.add_argument('-nps', type=int, required=False, default=3,
                   help='Torch threads for resampling/export (nnUNetv2_predict: export processes). Default: 3')
    p.add_argument('-prev_stage_predictions', type=str, required=False, default=None,
                   help='Cascades are not supported by GF-Screen; accepted for compatibility only.')
    p.add_argument('-num_parts', type=int, required=False, default=1,
                   help='Number of separate calls that split the cases. Default: 1')
    p.add_argument('-part_id', type=int, required=False, default=0,
                   help='Which part this call predicts (0 .. num_parts - 1). Default: 0')
    p.add_argument('-device', type=str, default='cuda', required=False,
                   help="'cuda', 'cpu' or 'mps'. Select the GPU with CUDA_VISIBLE_DEVICES.")
    p.add_argument('--disable_progress_bar', action='store_true', required=False, default=False,
                   help='Disable progress bars.')
    p.add_argument('--not_on_device', action='store_true', required=False, default=False,
                   help='Keep the result arrays in CPU memory (large cases).')
    gate = p.add_argument_group('GF-Screen gating')
    choose = gate.add_mutually_exclusive_group()
    choose.add_argument('--threshold', type=float, default=None,
                        help="Gate threshold on p(select) for all folds, instead of each fold's stored one.")
    choose.add_argument('--target_sensitivity', type=float, default=None,
                        help='Choose each fold\'s threshold from its stored calibration table '
                             '(gfscreen_calibration.json) for this tile sensitivity.')
    gate.add_argument('--dense', action='store_true', help='Run every tile through the Focus (comparison mode).')
    gate.add_argument('--tile_batch_size', type=int, default=4, help='Tiles per Focus forward pass. Default: 4')
    gate.add_argument('--report_dir', type=str, default=None,
                      help='Folder for <case>.json reports. Default: <output folder>/gfscreen_reports')
    gate.add_argument('--png', action='store_true',
                      help='Also write <case>.png: CT max projection with selected tiles and predicted lesions.')
    return p


def _device(name: str) -> torch.device:
    if name not in ('cpu', 'cuda', 'mps'):
        raise ValueError(f"-device must be cpu, cuda or mps, got {name!r}")
    if name == 'cpu':
        torch.set_num_threads(multiprocessing.cpu_count())
    elif name == 'cuda':
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    return torch.device(name)


def predict_gfscreen_entry_point() -> None:
    """Console script: returns None, since a console script's return value becomes its exit status."""
    run_predict_gfscreen()


def run_predict_gfscreen(argv: Optional[List[str]] = None) -> List[dict]:
    """The command with `argv` (default: sys.argv[1:]); returns the per-case reports."""
    args = _parser().parse_args(argv)
    folds = [i if i == 'all' else int(i) for i in args.f]
    if not 0 <= args.part_id < args.num_parts:
        raise ValueError(f"-part_id must be in [0, {args.num_parts - 1}], got {args.part_id}")
    if args.tile_batch_size < 1:
        raise ValueError(f"--tile_batch_size must be >= 1, got {args.tile_batch_size}")
    if args.prev_stage_predictions is not None:
        raise NotImplementedError("GF-Screen does not support cascaded models (-prev_stage_predictions)")
    model_folder = get_output_folder(args.d, args.tr, args.p, args.c)
    predictor = GFScreenPredictor(tile_step_size=args.step_size, use_gaussian=True,
                                  use_mirroring=not args.disable_tta,
                                  perform_everything_on_device=not args.not_on_device, device=_device(args.device),
                                  verbose=args.verbose, verbose_preprocessing=args.verbose,
                                  allow_tqdm=not args.disable_progress_bar, threshold=args.threshold,
                                  dense=args.dense, tile_batch_size=args.tile_batch_size)
    predictor.initialize_from_trained_model_folder(model_folder, folds, checkpoint_name=args.chk)
    if args.target_sensitivity is not None:
        thresholds = [threshold_for_sensitivity(load_calibration(join(model_folder, f'fold_{f}'), args.chk)['table'],
                                                args.target_sensitivity) for f in folds]
        print(f"thresholds for tile sensitivity {args.target_sensitivity}: "
              + ", ".join(f"fold {f}: {t:.6g}" for f, t in zip(folds, thresholds)))
        predictor.set_fold_thresholds(thresholds)
    return predict_folder(predictor, args.i, args.o, args.report_dir, args.png, args.save_probabilities,
                          overwrite=not args.continue_prediction, num_parts=args.num_parts, part_id=args.part_id,
                          num_threads_export=max(1, args.nps))
