"""Where a gate calibration lives: the checkpoint file, the one record of it.

A checkpoint holds its calibration record under the top-level key `gfscreen_calibration` (so it travels with
`nnUNetv2_export_model_to_zip`, which copies checkpoint files) and the rule it chose as the network's gate
buffers in `network_weights` (`gate.*`: the only thing the stock predictor reads). `save_calibration` writes
both in one atomic replacement of the file, so they cannot disagree. `<fold>/gfscreen_calibration.json` is a
derived copy for reading (one entry per checkpoint name), never read back by the code.
"""
import json
import os

import torch

from nnunetv2_gfscreen.atomic import torch_save, write_json
from nnunetv2_gfscreen.core.gate import Gate, GateRule

CALIBRATION_FILE = "gfscreen_calibration.json"
CHECKPOINT_KEY = "gfscreen_calibration"


def load_calibration(fold_folder: str, checkpoint_name: str = "checkpoint_final.pth") -> dict:
    """The calibration record of `checkpoint_name` (its `gfscreen_calibration` entry). FileNotFoundError when the
    checkpoint is missing, KeyError when it was never calibrated."""
    checkpoint_file = os.path.join(fold_folder, checkpoint_name)
    if not os.path.isfile(checkpoint_file):
        raise FileNotFoundError(f"{checkpoint_file} not found")
    stored = torch.load(checkpoint_file, map_location='cpu', weights_only=False).get(CHECKPOINT_KEY)
    if stored is None:
        raise KeyError(f"{checkpoint_file} holds no GF-Screen calibration (key {CHECKPOINT_KEY!r}); run "
                       f"nnUNetv2_gfscreen_calibrate for this fold")
    return stored


def write_calibration_into_checkpoint(checkpoint: dict, record: dict) -> None:
    """Put `record` and its rule (as the gate buffers of `network_weights`) into a loaded checkpoint dict."""
    weights = checkpoint.get('network_weights', {})
    if Gate.PREFIX + "threshold" not in weights:
        raise KeyError("the checkpoint's network_weights have no gate buffers: not a GF-Screen network of this "
                       "version")
    Gate.write_rule_into_state_dict(weights, GateRule.from_dict(record["rule"]))
    checkpoint[CHECKPOINT_KEY] = record


def save_calibration(record: dict, fold_folder: str, checkpoint_name: str = "checkpoint_final.pth") -> str:
    """Store `record` for `checkpoint_name`: into that checkpoint (record and rule, one atomic write) and into the
    derived JSON copy. Returns the JSON path. FileNotFoundError without the checkpoint."""
    checkpoint_file = os.path.join(fold_folder, checkpoint_name)
    if not os.path.isfile(checkpoint_file):
        raise FileNotFoundError(f"{checkpoint_file} not found: nothing to calibrate")
    checkpoint = torch.load(checkpoint_file, map_location='cpu', weights_only=False)
    write_calibration_into_checkpoint(checkpoint, record)
    torch_save(checkpoint, checkpoint_file)
    path = os.path.join(fold_folder, CALIBRATION_FILE)
    stored = {"checkpoints": {}}
    if os.path.isfile(path):
        with open(path) as f:
            stored = json.load(f)
    stored.setdefault("checkpoints", {})[checkpoint_name] = record
    write_json(stored, path)
    return path
