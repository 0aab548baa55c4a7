"""After training: calibrate the gate on the fold's validation cases, then validate the rule that is deployed.

`calibrate_fold` scores the validation cases (cases this fold's Glance never trained on), fits the gate's rule
(core/calibration.py) and stores the record and rule in the checkpoint (core/calibration_store.py). A model
trained on fold `all` has no held-out case: it is not calibrated on its own training cases; its record says
"uncalibrated" and it gates at p(select) > 0.5 until `nnUNetv2_gfscreen_calibrate -f all` is given cases it
never saw (or pooled cross-validation folds).

`validate_deployed_rule` runs nnU-Net's own `perform_actual_validation` with the gated sliding window of
`nnUNetv2_predict_gfscreen` (nnunet_adapters.final_validation_with), each validation case gated by the rule
fitted on the *other* validation cases by the same procedure (threshold rule, margin, envelope): the honest
estimate of the deployed gate. nnU-Net's validation/summary.json is therefore the gated product's; the gate's
own figures go to validation/gfscreen_gate.json (tile AUC, coverage per lesion size, a random gate at the
same budget), in preprocessed voxels, where the calibration measures coverage too.
"""
import os
from copy import deepcopy
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from nnunetv2_gfscreen.atomic import write_json
from nnunetv2_gfscreen.core.calibration import (CalibrationSettings, calibration_record, describe_calibration,
                                                preprocessed_cases, score_cases, uncalibrated_record)
from nnunetv2_gfscreen.core.calibration_store import CHECKPOINT_KEY, save_calibration
from nnunetv2_gfscreen.core.gate import GateRule
from nnunetv2_gfscreen.core.gated_window import GatedNnUNetPredictor
from nnunetv2_gfscreen.core.network import GFScreenNetwork
from nnunetv2_gfscreen.core.records import SlidingWindowRecord
from nnunetv2_gfscreen.evaluation.gate import GateCase, gate_figures
from nnunetv2_gfscreen.nnunet_adapters import final_validation_with

GATE_FILE = "gfscreen_gate.json"
CaseRecords = List[Tuple[str, SlidingWindowRecord]]


def calibrate_fold(trainer, network: GFScreenNetwork, checkpoint_name: str) -> dict:
    """Calibrate `network` (the weights of `checkpoint_name`) on the fold's validation cases, set its rule and
    store the record in the checkpoint; the other of checkpoint_final/best, if present and not yet calibrated,
    gets its own. Returns the record of `checkpoint_name`."""
    settings = CalibrationSettings.from_gfscreen(trainer.gfscreen)
    if trainer.fold == "all":
        record = uncalibrated_record(
            "fold 'all' trains on every case, so none is left to calibrate on (nnU-Net validates it on its training "
            "cases); calibrate with nnUNetv2_gfscreen_calibrate -f all -cal_images IMAGES -cal_labels LABELS on "
            "cases it never saw", source="none", settings=settings.to_dict())
        trainer.print_to_log_file("WARNING: GF-Screen gate NOT calibrated: " + record["reason"])
        return _store(trainer, network, record, checkpoint_name)
    _, val_keys = trainer.do_split()
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, list(val_keys),
                                    folder_with_segs_from_previous_stage=trainer.folder_with_segs_from_previous_stage)
    keys = list(dataset.identifiers)
    cm = trainer.configuration_manager

    def calibrate(net: GFScreenNetwork) -> dict:
        was_training = net.training
        net.eval()
        try:
            scored = score_cases(net, preprocessed_cases(dataset, keys), cm.patch_size, settings,
                                 trainer.gfscreen.tile_step_size, device=trainer.device,
                                 voxel_volume=float(np.prod(cm.spacing)), case_ids=keys)
        finally:
            net.train(was_training)
        return calibration_record(scored, settings, f"fold {trainer.fold} validation cases", cm.patch_size,
                                  trainer.gfscreen.tile_step_size)

    record = _store(trainer, network, calibrate(network), checkpoint_name)
    for other in ("checkpoint_final.pth", "checkpoint_best.pth"):
        other_file = os.path.join(trainer.output_folder, other)
        if other == checkpoint_name or not os.path.isfile(other_file):
            continue
        checkpoint = torch.load(other_file, map_location='cpu', weights_only=False)
        if CHECKPOINT_KEY in checkpoint:
            continue
        net = deepcopy(network)
        net.load_state_dict(checkpoint['network_weights'])
        save_calibration(calibrate(net), trainer.output_folder, other)
    return record


def _store(trainer, network: GFScreenNetwork, record: dict, checkpoint_name: str) -> dict:
    network.gate.set_rule(GateRule.from_dict(record["rule"]))
    if os.path.isfile(os.path.join(trainer.output_folder, checkpoint_name)):
        save_calibration(record, trainer.output_folder, checkpoint_name)
    trainer.print_to_log_file(f"GF-Screen calibration of {checkpoint_name}: {describe_calibration(record)}")
    return record


def case_rules(record: dict) -> Callable[[Optional[str]], GateRule]:
    """Case id -> the rule the final validation gates it with: its leave-one-case-out rule when the gate is
    calibrated, else the record's (uncalibrated) rule."""
    default = GateRule.from_dict(record["rule"])
    per_case = {k: GateRule.from_dict(v) for k, v in (record.get("loco") or {}).get("rules", {}).items()}
    return lambda case: per_case.get(case, default)


def validate_deployed_rule(trainer, record: dict, nnunet_validation: Callable[[], None]) -> CaseRecords:
    """Run `nnunet_validation` (nnU-Net's perform_actual_validation) predicting with the gated sliding window,
    each case at its rule (`case_rules`). Returns (case, record) of every case this process predicted."""
    cases: CaseRecords = []
    rule_of = case_rules(record)
    border_growth = bool(trainer.gfscreen.gate_border_growth)
    cursor_holder = {}

    class FinalValidationPredictor(GatedNnUNetPredictor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.border_growth = border_growth

        def predict_sliding_window_return_logits(self, input_image):
            case = cursor_holder["cursor"].current
            self.rule = rule_of(case)
            self.reset_records()
            logits = super().predict_sliding_window_return_logits(input_image)
            cases.append((case, self.records[-1]))  # the last: nnU-Net may retry off the device
            return logits

    with final_validation_with(trainer, FinalValidationPredictor) as cursor:
        cursor_holder["cursor"] = cursor
        trainer.print_to_log_file("GF-Screen: the final validation gates each case by the rule fitted on the other "
                                  "validation cases" if record.get("calibrated") else
                                  "GF-Screen: the final validation gates with the UNCALIBRATED rule")
        nnunet_validation()
    return cases


class _LesionMasks(Sequence):
    """The validation cases' lesion masks (preprocessed voxels), read one at a time."""

    def __init__(self, dataset, keys: Sequence[str]):
        self.dataset, self.keys = dataset, list(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i):
        seg = self.dataset.load_case(self.keys[i])[1]
        return np.asarray(seg[0][:]) > 0


def write_gate_figures(trainer, cases: CaseRecords, checkpoint_name: str, record: dict,
                       random_repeats: int = 20) -> dict:
    """Write <output_folder>/validation/gfscreen_gate.json: pooled gate figures of the final validation
    (`evaluation.gate.gate_figures`) and, per case, its rule and tiles. Returns the dict ({} and no file when no
    case was predicted)."""
    if not cases:
        trainer.print_to_log_file("GF-Screen: the final validation predicted no case; no gate figures written")
        return {}
    keys = [c for c, _ in cases]
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, keys,
                                    folder_with_segs_from_previous_stage=trainer.folder_with_segs_from_previous_stage)
    masks = _LesionMasks(dataset, keys)
    voxel_volume = float(np.prod(trainer.configuration_manager.spacing))
    gate_cases = [GateCase(np.array(r.bboxes, np.int64).reshape(-1, 3, 2), np.array(r.scores, np.float64),
                           np.array(r.selected, bool), masks[i], voxel_volume) for i, (_, r) in enumerate(cases)]
    pooled = gate_figures(gate_cases, target=trainer.gfscreen.target_lesion_sensitivity, random_repeats=random_repeats)
    figures = {
        "checkpoint": checkpoint_name,
        "calibrated": bool(record.get("calibrated")),
        "frame": "preprocessed voxels (as the calibration)",
        "rule_per_case": "fitted on the other validation cases (leave one case out)" if record.get("calibrated")
        else "uncalibrated",
        "pooled": pooled,
        "cases": [{"case": c, "threshold": r.threshold, "tiles": len(r.selected), "tiles_selected": r.tiles_selected,
                   "tiles_by_floor": r.tiles_by_floor, "fallback": r.fallback, "tiles_grown": r.tiles_grown,
                   "selection_ratio": r.tiles_selected / len(r.selected) if r.selected else None,
                   "glance_seconds": round(r.glance_seconds, 4), "focus_seconds": round(r.focus_seconds, 4)}
                  for c, r in cases],
    }
    path = os.path.join(trainer.output_folder, "validation", GATE_FILE)
    write_json(figures, path)
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    bins = ", ".join(f"{b['bin']} {b['covered']}/{b['lesions']}" for b in pooled["size_bins"] if b["lesions"])
    trainer.print_to_log_file(f"GF-Screen gate on the validation cases{'' if record.get('calibrated') else ' (UNCALIBRATED)'}: "
                              f"selection ratio {fmt(pooled['selection_ratio'])}, lesion coverage "
                              f"{fmt(pooled['lesion_coverage'])} ({bins or 'no lesions'}; random gate at the same "
                              f"budget {fmt(pooled['random_lesion_coverage'])}), tile AUC {fmt(pooled['tile_auc'])}")
    return figures
