"""The trainer's final validation predicts like `nnUNetv2_predict_gfscreen`: the gated sliding window.

nnU-Net's `perform_actual_validation` (100 lines: worker pool, export, next stages, DDP, summary.json) builds
`nnUNetPredictor(...)` by the name its module imported. `gated_final_validation` substitutes that one name,
for the duration of the call, with `GatedNnUNetPredictor` (core/gated_window.py: GFScreenPredictor's sliding
window), instead of copying the method; the rest of nnU-Net's validation, its summary.json included, is
unchanged. Each case's tile record is kept, and `write_gate_figures` writes validation/gfscreen_gate.json
(tile AUC, lesion coverage at the applied thresholds, a random gate at the same budget; evaluation/gate.py),
in preprocessed voxels, where the calibration measures coverage too.
"""
import os
from contextlib import contextmanager
from typing import Iterator, List, Sequence, Tuple

import numpy as np
import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module

from nnunetv2_gfscreen.atomic import write_json
from nnunetv2_gfscreen.core.gated_window import GatedNnUNetPredictor, SlidingWindowRecord
from nnunetv2_gfscreen.evaluation.gate import gate_figures

GATE_FILE = "gfscreen_gate.json"
CaseRecords = List[Tuple[str, SlidingWindowRecord]]


@contextmanager
def gated_final_validation(trainer) -> Iterator[CaseRecords]:
    """While active, nnU-Net's final validation predicts with the gated sliding window; yields the list that
    receives (case, record) per predicted case. Composes with `loco_thresholds_during_validation` (the
    record's threshold is the network's at that case, i.e. its leave-one-case-out threshold)."""
    cases: CaseRecords = []
    current = {"case": None}

    class FinalValidationPredictor(GatedNnUNetPredictor):
        def predict_sliding_window_return_logits(self, input_image):
            self.reset_records()
            logits = super().predict_sliding_window_return_logits(input_image)
            cases.append((current["case"], self.records[-1]))  # the last: nnU-Net may retry off the device
            return logits

    base = trainer.dataset_class

    def load_case(self, identifier):
        loaded = base.load_case(self, identifier)
        current["case"] = identifier
        return loaded

    original = nnunet_trainer_module.nnUNetPredictor
    trainer.dataset_class = type(f"Recording{base.__name__}", (base,), {"load_case": load_case})
    nnunet_trainer_module.nnUNetPredictor = FinalValidationPredictor
    try:
        yield cases
    finally:
        nnunet_trainer_module.nnUNetPredictor = original
        trainer.dataset_class = base


class _LesionMasks(Sequence):
    """The validation cases' lesion masks (preprocessed voxels), read one at a time (gate_figures iterates)."""

    def __init__(self, dataset, keys: Sequence[str]):
        self.dataset, self.keys = dataset, list(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i):
        seg = self.dataset.load_case(self.keys[i])[1]
        return np.asarray(seg[0][:]) > 0


def _report(record: SlidingWindowRecord) -> dict:
    return {"tiles": [{"bbox_original": b, "score": s, "selected": k}
                      for b, s, k in zip(record.bboxes, record.scores, record.selected)]}


def write_gate_figures(trainer, cases: CaseRecords, checkpoint_name: str, random_repeats: int = 20) -> dict:
    """Write <output_folder>/validation/gfscreen_gate.json: pooled gate figures of the final validation
    (`evaluation.gate.gate_figures`) and, per case, its threshold, tiles and tiles selected. Returns the dict
    ({} and no file when no case was predicted)."""
    if not cases:
        trainer.print_to_log_file("GF-Screen: the final validation predicted no case; no gate figures written")
        return {}
    keys = [c for c, _ in cases]
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, keys,
                                    folder_with_segs_from_previous_stage=trainer.folder_with_segs_from_previous_stage)
    pooled = gate_figures([_report(r) for _, r in cases], _LesionMasks(dataset, keys),
                          target=trainer.gfscreen.target_lesion_sensitivity, random_repeats=random_repeats)
    figures = {
        "checkpoint": checkpoint_name,
        "frame": "preprocessed voxels (as the calibration)",
        "pooled": pooled,
        "cases": [{"case": c, "threshold": r.threshold, "tiles": len(r.selected), "tiles_selected": r.tiles_selected,
                   "selection_ratio": r.tiles_selected / len(r.selected) if r.selected else None,
                   "glance_seconds": round(r.glance_seconds, 4), "focus_seconds": round(r.focus_seconds, 4)}
                  for c, r in cases],
    }
    path = os.path.join(trainer.output_folder, "validation", GATE_FILE)
    write_json(figures, path)
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    trainer.print_to_log_file(f"GF-Screen gate on the validation cases: selection ratio {fmt(pooled['selection_ratio'])}, "
                              f"lesion coverage {fmt(pooled['lesion_coverage'])} (random gate at the same budget "
                              f"{fmt(pooled['random_lesion_coverage'])}), tile AUC {fmt(pooled['tile_auc'])}")
    return figures
