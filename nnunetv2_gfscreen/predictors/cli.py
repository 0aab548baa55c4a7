"""nnUNetv2_predict_gfscreen: nnUNetv2_predict's arguments plus Glance gating options and per-case reports.

Each case goes read -> preprocess -> gated sliding window -> export -> report. With -npp/-nps > 0,
background threads preprocess the next cases and export the previous ones while the current case's
sliding window runs (pipeline.py); the reports give each case's wall time from read start to mask
written and the phase times, gfscreen_pipeline.json the folder's. On CUDA (--torch_io auto) the
preprocessing and export run with torch on the GPU. A case with bad input (unreadable, wrong channel
count, NaN/inf) writes nothing; the other cases are still predicted and the command fails at the end
naming every bad case.
"""
import inspect
import multiprocessing
import os
import time
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import isdir, join, maybe_mkdir_p, save_json

from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from nnunetv2.utilities.file_path_utilities import get_output_folder
from nnunetv2.utilities.helpers import empty_cache
from nnunetv2.utilities.json_export import recursive_fix_for_json_export

from nnunetv2_gfscreen.atomic import stale_partials
from nnunetv2_gfscreen.core.calibration import RECORD_VERSION, certificate_summary, refit_rule
from nnunetv2_gfscreen.core.calibration_store import load_calibration
from nnunetv2_gfscreen.core.case_report import write_case_report
from nnunetv2_gfscreen.core.gate import GateRule
from nnunetv2_gfscreen.core.operating_point import describe_certificate
from nnunetv2_gfscreen.core.records import selected_tiles_bbox
from nnunetv2_gfscreen.predictors.gfscreen_predictor import CaseInputError, GFScreenPredictor
from nnunetv2_gfscreen.predictors.cli_args import build_parser
from nnunetv2_gfscreen.predictors.pipeline import run_pipeline
from nnunetv2_gfscreen.predictors.case_summary import build_case_report, lesion_components, save_case_png


@dataclass
class _CaseState:
    """One case on its way through the pipeline (data, then logits, are dropped once used)."""
    case: str
    image_files: List[str]
    output_file_truncated: str
    started: float = 0.0
    data: Optional[torch.Tensor] = None
    properties: Optional[dict] = None
    logits: Optional[torch.Tensor] = None
    records: list = field(default_factory=list)
    covered_bbox: Optional[list] = None
    seconds: Dict[str, float] = field(default_factory=dict)


def _preprocess_stage(predictor: GFScreenPredictor, state: _CaseState) -> _CaseState:
    state.started = time.perf_counter()
    state.data, state.properties = predictor.preprocess_case(state.image_files, state.case)
    state.seconds['preprocess'] = time.perf_counter() - state.started
    return state


def _predict_stage(predictor: GFScreenPredictor, state: _CaseState) -> _CaseState:
    """The sliding window (caller's thread). Logits stay (K, *preprocessed shape); the tile records are copied."""
    t0 = time.perf_counter()  # no device-wide synchronize: background threads may use the GPU too
    predictor.reset_records()
    state.logits = predictor.predict_logits_from_preprocessed_data(state.data)
    state.data = None
    state.records = list(predictor.records)
    if predictor.use_torch_io:
        state.covered_bbox = selected_tiles_bbox(state.records)
    state.seconds['sliding_window'] = time.perf_counter() - t0  # the logits are on the CPU: work is done
    return state


def _export_stage(predictor: GFScreenPredictor, state: _CaseState, report_dir: str, png: bool,
                  save_probabilities: bool, num_threads_export: int) -> dict:
    """Export, then the report (total_seconds = read start .. mask written) and the optional PNG."""
    t0 = time.perf_counter()
    mask_file, mask = predictor.export_case_and_mask(state.logits, state.properties, state.output_file_truncated,
                                                     save_probabilities, num_threads_export,
                                                     covered_bbox=state.covered_bbox, case=state.case)
    state.logits = None
    t1 = time.perf_counter()
    rw = predictor.plans_manager.image_reader_writer_class()
    if mask is None:  # nnU-Net's export wrote it without handing it back
        mask = rw.read_seg(mask_file)[0][0]
    lesions = lesion_components(mask, state.properties['spacing'])
    report = build_case_report(state.case, state.records, state.properties,
                               predictor.plans_manager.transpose_backward, lesions, t1 - state.started)
    report.update(torch_io=predictor.use_torch_io,
                  preprocess_seconds=round(state.seconds['preprocess'], 4),
                  sliding_window_seconds=round(state.seconds['sliding_window'], 4),
                  export_seconds=round(t1 - t0, 4))
    if predictor.calibration is not None:
        report["gate"]["calibration"] = predictor.calibration
    write_case_report(report, report_dir)
    if png:
        image, _ = rw.read_images(state.image_files)
        save_case_png(np.asarray(image[0]), mask, report, join(report_dir, f"{state.case}.png"))
    print(f"done with {state.case}")
    return report


def remove_stale_partials(folders: Sequence[str], cases: Sequence[str]) -> List[str]:
    """Delete the temporary files (`atomic.partial_name`) that a killed earlier run left for `cases`' outputs
    (mask, probabilities, report, picture), so that a rerun (--continue_prediction) leaves no partial file behind.
    Returns the removed paths."""
    wanted, removed = set(cases), []
    for folder in folders:
        for path, target in stale_partials(folder):
            if target in wanted or any(target.startswith(c + ".") for c in wanted):
                os.remove(path)
                removed.append(path)
    return removed


def predict_folder(predictor: GFScreenPredictor, input_folder: str, output_folder: str,
                   report_dir: Optional[str] = None, png: bool = False, save_probabilities: bool = False,
                   overwrite: bool = True, num_parts: int = 1, part_id: int = 0,
                   num_processes_preprocessing: int = 0, num_processes_segmentation_export: int = 0) -> List[dict]:
    """Predict every case of `input_folder` into `output_folder` with one JSON report (and PNG) per case.

    num_processes_preprocessing / num_processes_segmentation_export (-npp/-nps): background worker threads
    that read+preprocess the next cases and export+write the previous ones while the current case's sliding
    window runs (0 and 0: one case after another). Writes <output_folder>/gfscreen_pipeline.json
    (pipeline_seconds: the folder's wall time) when at least one case was predicted. Returns the reports
    in case order. Raises FileNotFoundError/ValueError for a missing or empty input folder, CaseInputError
    (after all good cases are done) if any case had bad input, CaseFailedError naming the case otherwise.
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
    args.update(threshold=predictor.threshold, dense=predictor.dense, tile_batch_size=predictor.tile_batch_size,
                torch_io=predictor.torch_io)
    args = deepcopy(args)
    recursive_fix_for_json_export(args)
    save_json(args, join(output_folder, 'predict_from_raw_data_args.json'))
    save_json(predictor.dataset_json, join(output_folder, 'dataset.json'), sort_keys=False)
    save_json(predictor.plans_manager.plans, join(output_folder, 'plans.json'), sort_keys=False)

    lists, truncated, _ = predictor.case_lists(input_folder, output_folder, overwrite, part_id, num_parts,
                                               save_probabilities)
    remove_stale_partials([output_folder, report_dir], [os.path.basename(t) for t in truncated])
    states = [_CaseState(os.path.basename(t), files, t) for files, t in zip(lists, truncated)]
    # nnU-Net's export sets torch's (process-wide) thread count; keep it where the sliding window has it
    export_threads = torch.get_num_threads()
    t0 = time.perf_counter()
    reports, failures = run_pipeline(
        states, [s.case for s in states],
        preprocess=lambda s: _preprocess_stage(predictor, s),
        predict=lambda s: _predict_stage(predictor, s),
        export=lambda s: _export_stage(predictor, s, report_dir, png, save_probabilities, export_threads),
        num_preprocess=num_processes_preprocessing, num_export=num_processes_segmentation_export,
        skip=(CaseInputError,))
    pipeline_seconds = time.perf_counter() - t0
    for e in failures:
        print(f"SKIPPED {e}")
    compute_gaussian.cache_clear()
    empty_cache(predictor.device)
    if reports:
        summary = {"pipeline_seconds": round(pipeline_seconds, 4), "cases_predicted": len(reports),
                   "cases_skipped": len(failures), "seconds_per_case": round(pipeline_seconds / len(reports), 4),
                   "num_processes_preprocessing": num_processes_preprocessing,
                   "num_processes_segmentation_export": num_processes_segmentation_export,
                   "torch_io": predictor.use_torch_io, "device": str(predictor.device)}
        save_json(summary, join(output_folder, 'gfscreen_pipeline.json'), sort_keys=False)
        print(f"{len(reports)} case(s) in {pipeline_seconds:.2f} s ({summary['seconds_per_case']:.2f} s per case)")
    if failures:
        raise CaseInputError(f"{len(failures)} case(s) could not be predicted (no output written for them):\n  "
                             + "\n  ".join(str(e) for e in failures))
    return reports


def rules_from_calibration(model_folder: str, folds: Sequence, checkpoint_name: str,
                           target_sensitivity: Optional[float] = None,
                           max_selection: Optional[float] = None) -> List[GateRule]:
    """Each fold's gate rule re-fitted from its stored calibration cases (`calibration.refit_rule`, the
    calibration's own rule); prints each threshold and what the calibration cases certify at it."""
    wanted = [f"lesion-level sensitivity target {target_sensitivity}"] if target_sensitivity is not None else []
    wanted += [f"selection ratio <= {max_selection}"] if max_selection is not None else []
    print(f"gate rules re-fitted from the stored calibration for {' and '.join(wanted)}:")
    rules = []
    for f in folds:
        record = load_calibration(join(model_folder, f'fold_{f}'), checkpoint_name)
        if record.get("version") != RECORD_VERSION:
            raise ValueError(f"fold {f}'s calibration record is from an older version; run nnUNetv2_gfscreen_calibrate "
                             f"for it again")
        rule, cert, bound = refit_rule(record, target_sensitivity, max_selection)
        print(f"  fold {f}: threshold logit {rule.threshold:.6g} (bound by the {bound}); "
              f"{describe_certificate(cert)}")
        rules.append(rule)
    return rules


def _device(name: str) -> torch.device:
    if name not in ('cpu', 'cuda', 'mps'):
        raise ValueError(f"-device must be cpu, cuda or mps, got {name!r}")
    if name == 'cpu':
        torch.set_num_threads(multiprocessing.cpu_count())
    elif name == 'cuda':
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    return torch.device(name)


def _calibrations(predictor: GFScreenPredictor, model_folder: str, folds: Sequence, checkpoint_name: str) -> None:
    """Each fold's calibration summary for the reports (`predictor.calibration`), printed once; a warning for a
    fold whose gate is not calibrated."""
    summaries = []
    for f, params in zip(folds, predictor.list_of_parameters):
        try:
            summaries.append(certificate_summary(load_calibration(join(model_folder, f'fold_{f}'), checkpoint_name)))
        except KeyError:
            summaries.append({"calibrated": False, "reason": "the checkpoint holds no calibration record"})
    if predictor.dense:
        return
    for f, s in zip(folds, summaries):
        if not s["calibrated"]:
            print(f"WARNING: the gate of fold {f} is not calibrated ({s['reason']}): it selects tiles with "
                  f"p(select) > 0.5 and certifies nothing; calibrate it with nnUNetv2_gfscreen_calibrate")
        else:
            fmt = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
            print(f"gate of fold {f}: calibrated on {s['source']} ({s['method']}); certified: expected lesion-level "
                  f"sensitivity >= {fmt(s['expected_sensitivity_certified'])}, lesion-level sensitivity >= "
                  f"{fmt(s['lesion_sensitivity_lower_bound'])} at {100 * s['confidence']:.0f}% confidence")
    predictor.calibration = summaries[0] if len(summaries) == 1 else {"folds": summaries}


def predict_gfscreen_entry_point() -> None:
    """Console script: returns None, since a console script's return value becomes its exit status."""
    run_predict_gfscreen()


def run_predict_gfscreen(argv: Optional[List[str]] = None) -> List[dict]:
    """The command with `argv` (default: sys.argv[1:]); returns the per-case reports."""
    args = build_parser().parse_args(argv)
    folds = [i if i == 'all' else int(i) for i in args.f]
    if not 0 <= args.part_id < args.num_parts:
        raise ValueError(f"-part_id must be in [0, {args.num_parts - 1}], got {args.part_id}")
    if args.npp < 0 or args.nps < 0:
        raise ValueError(f"-npp and -nps must be >= 0, got {args.npp} and {args.nps}")
    if args.tile_batch_size < 1:
        raise ValueError(f"--tile_batch_size must be >= 1, got {args.tile_batch_size}")
    if args.prev_stage_predictions is not None:
        raise NotImplementedError("GF-Screen does not support cascaded models (-prev_stage_predictions)")
    if args.threshold is not None and (args.target_sensitivity is not None or args.max_selection is not None):
        raise ValueError("--threshold fixes the gate threshold; it cannot be combined with --target_sensitivity "
                         "or --max_selection, which choose it from the stored calibration")
    model_folder = get_output_folder(args.d, args.tr, args.p, args.c)
    predictor = GFScreenPredictor(tile_step_size=args.step_size, use_gaussian=True,
                                  use_mirroring=not args.disable_tta,
                                  perform_everything_on_device=not args.not_on_device, device=_device(args.device),
                                  verbose=args.verbose, verbose_preprocessing=args.verbose,
                                  allow_tqdm=not args.disable_progress_bar, threshold=args.threshold,
                                  dense=args.dense, tile_batch_size=args.tile_batch_size, torch_io=args.torch_io,
                                  border_growth=False if args.no_border_growth else None,
                                  score_dense=args.score_tiles)
    predictor.initialize_from_trained_model_folder(model_folder, folds, checkpoint_name=args.chk)
    if args.target_sensitivity is not None or args.max_selection is not None:
        predictor.set_fold_rules(rules_from_calibration(model_folder, folds, args.chk, args.target_sensitivity,
                                                        args.max_selection))
    _calibrations(predictor, model_folder, folds, args.chk)
    return predict_folder(predictor, args.i, args.o, args.report_dir, args.png, args.save_probabilities,
                          overwrite=not args.continue_prediction, num_parts=args.num_parts, part_id=args.part_id,
                          num_processes_preprocessing=args.npp, num_processes_segmentation_export=args.nps)
