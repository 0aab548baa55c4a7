"""The retrofit's cache: one dense Focus prediction per training case, made once, read by every step.

A frozen Focus predicts a training case the same way at every step, so the reward of any tile (does
the Focus's prediction overlap the lesion in that tile) can be read from one sliding-window
prediction per case instead of a Focus forward pass per tile and step. Each case's foreground
(argmax > 0) is stored bit-packed (`np.packbits`, 1 bit per voxel) in preprocessed space, in

    <nnUNet_preprocessed>/<dataset>/<data_identifier>_gfscreen_focus_cache/<fingerprint[:16]>/<case>.npz

The fingerprint hashes the Focus's weights and everything else the prediction depends on (patch size,
tile step, no mirroring), so a different model or setting never reads another's cache; `cache.json`
in the folder records the full fingerprint. Files are written atomically (no half-written case).
"""
import hashlib
import json
import os
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunetv2_gfscreen.trainers.pretrained import focus_fingerprint

CACHE_FORMAT = 1


def cache_fingerprint(focus: nn.Module, patch_size: Sequence[int], tile_step_size: float) -> str:
    """sha256 over the Focus weights and the sliding-window settings that shape the cached prediction."""
    settings = json.dumps({"format": CACHE_FORMAT, "patch_size": [int(p) for p in patch_size],
                           "tile_step_size": float(tile_step_size), "mirroring": False, "gaussian": True})
    return hashlib.sha256((focus_fingerprint(focus) + settings).encode()).hexdigest()


def cache_folder(preprocessed_dataset_folder_base: str, data_identifier: str, fingerprint: str) -> str:
    return os.path.join(preprocessed_dataset_folder_base, f"{data_identifier}_gfscreen_focus_cache", fingerprint[:16])


def save_foreground(path: str, foreground: np.ndarray) -> None:
    """Write a bool volume bit-packed, atomically (tmp file + os.replace)."""
    tmp = path + ".tmp.npz"
    np.savez(tmp, bits=np.packbits(foreground.astype(bool), axis=None), shape=np.array(foreground.shape))
    os.replace(tmp, path)


def load_foreground(path: str) -> np.ndarray:
    """The bool volume written by `save_foreground`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no cached Focus prediction {path}; the retrofit trainer computes the cache "
                                f"before training (was the cache folder deleted while training?)")
    with np.load(path) as f:
        shape = tuple(int(s) for s in f["shape"])
        return np.unpackbits(f["bits"], count=int(np.prod(shape))).astype(bool).reshape(shape)


@torch.no_grad()
def build_focus_cache(focus: nn.Module, dataset, keys: Sequence[str], folder: str, fingerprint: str,
                      plans_manager, configuration_manager, dataset_json: dict, tile_step_size: float,
                      device: torch.device, log=print, source: Optional[dict] = None) -> Dict[str, str]:
    """Predict every case in `keys` that the cache lacks with nnU-Net's sliding window; returns {case: file}.

    focus: the trained network (eval mode, deep supervision off); dataset: an nnU-Net dataset of the
    preprocessed cases. Foreground = argmax > 0 of the Gaussian-blended logits (no mirroring: the joint
    trainer's rewards use none either).
    """
    os.makedirs(folder, exist_ok=True)
    meta_file = os.path.join(folder, "cache.json")
    meta = {"fingerprint": fingerprint, "format": CACHE_FORMAT, "tile_step_size": tile_step_size,
            "patch_size": list(configuration_manager.patch_size), "source": source or {}}
    if os.path.isfile(meta_file):
        with open(meta_file) as f:
            stored = json.load(f)
        if stored.get("fingerprint") != fingerprint:
            raise RuntimeError(f"{meta_file} belongs to another Focus (fingerprint {stored.get('fingerprint')}, "
                               f"expected {fingerprint}); delete the folder")
    else:
        with open(meta_file + ".tmp", "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(meta_file + ".tmp", meta_file)
    files = {k: os.path.join(folder, f"{k}.npz") for k in keys}
    todo = [k for k in keys if not os.path.isfile(files[k])]
    log(f"GF-Screen retrofit: Focus cache {folder}: {len(keys) - len(todo)} of {len(keys)} cases cached, "
        f"predicting {len(todo)}")
    if not todo:
        return files
    predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=device.type == "cuda", device=device,
                                verbose=False, allow_tqdm=False)
    predictor.manual_initialization(focus, plans_manager, configuration_manager, None, dataset_json,
                                    "GFScreenTrainer_Retrofit", None)
    was_training = focus.training
    try:
        for key in tqdm(todo, desc="Focus cache", unit="case"):
            data = dataset.load_case(key)[0]
            logits = predictor.predict_sliding_window_return_logits(torch.from_numpy(np.asarray(data)).float())
            save_foreground(files[key], (logits.argmax(0) > 0).cpu().numpy())
    finally:
        focus.train(was_training)
    return files
