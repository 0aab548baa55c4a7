"""The environment of a child process that runs nnU-Net's commands with a lab trainer (`-tr GFScreenTrainer_Tiny`).

nnU-Net 2.8 finds `-tr NAME` in the folders of `nnUNet_extTrainer`. The installed product registers its own
folder at interpreter start (its .pth appends it); the lab is not installed, so a process that needs a lab
trainer gets the lab's shim folder appended to `nnUNet_extTrainer` (entries already there are kept, in
front) and the repository root on PYTHONPATH (the shim imports `gfscreen_lab`).
"""
import os
from typing import Dict, Mapping

ENV_VAR = "nnUNet_extTrainer"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAB_SHIM_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ext_trainer")


def _append_once(value: str, entry: str, front: bool = False) -> str:
    entries = [p for p in value.split(os.pathsep) if p.strip()]
    if not any(os.path.abspath(p) == entry for p in entries):
        entries = [entry] + entries if front else entries + [entry]
    return os.pathsep.join(entries)


def lab_environment(environ: Mapping[str, str]) -> Dict[str, str]:
    """A copy of `environ` with LAB_SHIM_FOLDER appended to `nnUNet_extTrainer` and REPO_ROOT in front of
    PYTHONPATH (each only if not listed already)."""
    env = dict(environ)
    env[ENV_VAR] = _append_once(env.get(ENV_VAR, ""), LAB_SHIM_FOLDER)
    env["PYTHONPATH"] = _append_once(env.get("PYTHONPATH", ""), REPO_ROOT, front=True)
    return env
