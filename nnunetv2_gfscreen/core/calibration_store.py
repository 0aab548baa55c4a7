"""Where a gate calibration lives: in the checkpoint file and in the fold's calibration JSON.

Each checkpoint file holds its calibration under the top-level key `gfscreen_calibration` (so it travels
with `nnUNetv2_export_model_to_zip`, which copies checkpoint files) and the chosen threshold in
`network_weights['threshold']` (the only thing the stock predictor reads). `<fold>/gfscreen_calibration.json`
holds the same entries, one per checkpoint name: {"checkpoints": {name: calibration}}. Files are replaced
atomically (temporary file + os.replace).
"""
import json
import os
from typing import Optional

import torch

from nnunetv2_gfscreen.atomic import torch_save, write_json

CALIBRATION_FILE = "gfscreen_calibration.json"
CHECKPOINT_KEY = "gfscreen_calibration"


def load_calibration(fold_folder: str, checkpoint_name: str = "checkpoint_final.pth") -> dict:
    """The calibration of `checkpoint_name`: the checkpoint's `gfscreen_calibration` entry, else the fold's
    gfscreen_calibration.json entry. FileNotFoundError/KeyError when neither has one."""
    checkpoint_file = os.path.join(fold_folder, checkpoint_name)
    if os.path.isfile(checkpoint_file):
        stored = torch.load(checkpoint_file, map_location='cpu', weights_only=False).get(CHECKPOINT_KEY)
        if stored is not None:
            return stored
    path = os.path.join(fold_folder, CALIBRATION_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GF-Screen calibration in {checkpoint_file} (key {CHECKPOINT_KEY!r}) nor at "
                                f"{path}; run nnUNetv2_gfscreen_calibrate for this fold")
    with open(path) as f:
        stored = json.load(f)
    if checkpoint_name not in stored.get("checkpoints", {}):
        raise KeyError(f"{path} has no calibration for {checkpoint_name} (it has {sorted(stored.get('checkpoints', {}))})")
    return stored["checkpoints"][checkpoint_name]


def write_threshold_into_checkpoint(checkpoint_file: str, threshold: float, calibration: Optional[dict] = None) -> None:
    """Set `network_weights['threshold']` of a checkpoint file (and its `gfscreen_calibration` entry when
    `calibration` is given), replacing the file atomically."""
    checkpoint = torch.load(checkpoint_file, map_location='cpu', weights_only=False)
    weights = checkpoint.get('network_weights', {})
    if 'threshold' not in weights:
        raise KeyError(f"{checkpoint_file} has no network_weights['threshold']: not a GFScreenNetwork checkpoint")
    weights['threshold'] = torch.tensor(float(threshold), dtype=torch.float64)   # float64: see GFScreenNetwork
    if calibration is not None:
        checkpoint[CHECKPOINT_KEY] = calibration
    torch_save(checkpoint, checkpoint_file)


def save_calibration(result: dict, fold_folder: str, checkpoint_name: str = "checkpoint_final.pth") -> str:
    """Store `result` for `checkpoint_name`: into that checkpoint (key and threshold; if the file exists) and
    into the fold's calibration JSON. Returns the JSON path."""
    path = os.path.join(fold_folder, CALIBRATION_FILE)
    stored = {"checkpoints": {}}
    if os.path.isfile(path):
        with open(path) as f:
            stored = json.load(f)
    stored.setdefault("checkpoints", {})[checkpoint_name] = result
    checkpoint_file = os.path.join(fold_folder, checkpoint_name)
    if os.path.isfile(checkpoint_file):
        write_threshold_into_checkpoint(checkpoint_file, result["threshold"], result)
    write_json(stored, path)
    return path
