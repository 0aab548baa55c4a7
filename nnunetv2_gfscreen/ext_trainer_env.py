"""Registers our trainer shim folder in `nnUNet_extTrainer` (run at interpreter start by the .pth file).

nnU-Net 2.8 searches every folder listed in `nnUNet_extTrainer` for `-tr NAME`. We append the
folder holding one uniquely named shim module; a value the user already set is kept in front.
Keep this module free of heavy imports: it runs in every Python process of the environment.
"""
import os

ENV_VAR = "nnUNet_extTrainer"
SHIM_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ext_trainer")


def register_ext_trainer_folder(environ=os.environ) -> str:
    """Append SHIM_FOLDER to `nnUNet_extTrainer` unless it is listed already; returns the new value."""
    current = environ.get(ENV_VAR, "")
    entries = [p for p in current.split(os.pathsep) if p.strip()]
    if not any(os.path.abspath(p) == SHIM_FOLDER for p in entries):
        entries.append(SHIM_FOLDER)
    environ[ENV_VAR] = os.pathsep.join(entries)
    return environ[ENV_VAR]


register_ext_trainer_folder()
