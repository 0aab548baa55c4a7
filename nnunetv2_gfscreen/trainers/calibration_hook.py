"""The trainer's calibration hook: calibrate the gate on the fold's validation cases after training and
predict each of them at its leave-one-case-out threshold in the final validation (maths: core.calibration)."""
import os
from contextlib import contextmanager
from copy import deepcopy
from typing import Optional

import torch

from nnunetv2_gfscreen.core.calibration import calibrate_threshold, describe_calibration, preprocessed_cases
from nnunetv2_gfscreen.core.calibration_store import CHECKPOINT_KEY, save_calibration
from nnunetv2_gfscreen.core.network import unwrap_gfscreen_network


def calibrate_trainer(trainer, target_sensitivity: Optional[float] = None, tile_margin: Optional[float] = None,
                      checkpoint_name: str = "checkpoint_final.pth") -> dict:
    """Calibrate a trained GFScreenTrainer's gate on its validation cases (call before the final validation).

    The live network (the weights of `checkpoint_name`: checkpoint_best.pth after `--val_best` loaded it) is
    calibrated, its `threshold` buffer set (all-cases threshold), and the result stored for `checkpoint_name`.
    The other of checkpoint_final.pth / checkpoint_best.pth, if present in the output folder and not yet
    calibrated (nnU-Net rewrites a checkpoint without our entry), gets its own calibration (its Glance
    differs). Returns the result for the live weights.
    """
    target = trainer.gfscreen.target_lesion_sensitivity if target_sensitivity is None else target_sensitivity
    tile_margin = trainer.gfscreen.calibration_tile_margin if tile_margin is None else tile_margin
    network = unwrap_gfscreen_network(trainer.network)
    _, val_keys = trainer.do_split()
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, list(val_keys),
                                    folder_with_segs_from_previous_stage=trainer.folder_with_segs_from_previous_stage)
    keys = list(dataset.identifiers)
    patch_size = trainer.configuration_manager.patch_size
    calibrate = lambda net: calibrate_threshold(net, preprocessed_cases(dataset, keys), target, patch_size,  # noqa
                                                device=trainer.device, tile_margin=tile_margin, case_ids=keys)
    result = calibrate(network)
    network.threshold.fill_(result["threshold"])
    save_calibration(result, trainer.output_folder, checkpoint_name)
    trainer.print_to_log_file(f"GF-Screen calibration of {checkpoint_name}: {describe_calibration(result)}")
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
