"""GFScreenTrainer's validation: the online validation (the Focus ungated, plus the Glance's tile sensitivity and
specificity on nnU-Net's validation patches), the epoch log lines, and the final validation (calibrate, then
predict every validation case with the gated sliding window at its leave-one-case-out threshold)."""
from typing import List

import numpy as np

from nnunetv2_gfscreen.core.gate import GateRule, select_tiles
from nnunetv2_gfscreen.trainers.final_validation import calibrate_fold, validate_deployed_rule, write_gate_figures


class GFScreenValidationMixin:
    """Mixed into GFScreenTrainer (before nnU-Net's trainer); uses its `_gfscreen_network`, `_to_device`,
    `_autocast`, `_lesion_masks`, `weights_checkpoint` and the DDP helpers (`gather_sum`, `gather_lists`,
    `broadcast_from_rank0`)."""

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self._gfscreen_network().gating_enabled = False  # online validation measures the Focus itself

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's validation step plus the Glance's tile confusion counts on the validation patches."""
        net = self._gfscreen_network()
        data, target = self._to_device(batch["data"], batch["target"])
        with self._autocast():
            selected = select_tiles(net.glance_logits(data), net.gate.threshold)
        lesion = self._lesion_masks(target[0] if isinstance(target, list) else target)[0].flatten(1).any(1)
        # tensors already on the device: nnU-Net's own .to() calls are then no-ops, not second copies
        out = super().validation_step({**batch, "data": data, "target": target})
        out["glance_counts"] = np.array([(selected & lesion).sum().item(), (~selected & lesion).sum().item(),
                                         (~selected & ~lesion).sum().item(), (selected & ~lesion).sum().item()])
        return out

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        super().on_validation_epoch_end(val_outputs)
        tp, fn, tn, fp = self.gather_sum(np.sum([o["glance_counts"] for o in val_outputs], axis=0))
        self.logger.log("glance_sensitivity", float(tp / (tp + fn)) if tp + fn else float("nan"), self.current_epoch)
        self.logger.log("glance_specificity", float(tn / (tn + fp)) if tn + fp else float("nan"), self.current_epoch)
        self._gfscreen_network().gating_enabled = True

    def on_epoch_end(self):
        get = lambda k: np.round(self.logger.get_value(k, step=-1), decimals=4)
        self.print_to_log_file(f"seg_loss {get('seg_losses')}, GRL {get('grl_losses')} (clip {get('grl_clip')}, "
                               f"kl {get('grl_kl')}, ce {get('grl_ce')}), Glance dense {get('glance_dense')}, mean reward {get('mean_reward')}, "
                               f"selection ratio {get('selection_ratio')}")
        self.print_to_log_file(f"Glance on validation patches: sensitivity {get('glance_sensitivity')}, "
                               f"specificity {get('glance_specificity')}")
        super().on_epoch_end()

    def on_train_end(self):
        super().on_train_end()
        self.weights_checkpoint = "checkpoint_final.pth"  # the live weights are the final ones now

    def perform_actual_validation(self, save_probabilities: bool = False):
        """Calibrate the gate of the loaded weights (checkpoint_best.pth with --val_best) on the validation cases,
        then nnU-Net's final validation predicted the way `nnUNetv2_predict_gfscreen` predicts, each case gated by
        the rule fitted on the other validation cases (final_validation.py). Writes nnU-Net's
        validation/summary.json and gfscreen_gate.json. Under DDP rank 0 calibrates, every rank predicts its share
        of the cases with the broadcast record, and rank 0 writes the gate figures of all of them."""
        net = self._gfscreen_network()
        record = self.broadcast_from_rank0(calibrate_fold(self, net, self.weights_checkpoint)
                                           if self.local_rank == 0 else None)
        if self.local_rank != 0:
            net.gate.set_rule(GateRule.from_dict(record["rule"]))
        cases = validate_deployed_rule(self, record, lambda: super(GFScreenValidationMixin, self)
                                       .perform_actual_validation(save_probabilities))
        cases = self.gather_lists(cases)
        if self.local_rank == 0:
            write_gate_figures(self, cases, self.weights_checkpoint, record)
