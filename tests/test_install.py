"""The install registers our trainers with nnU-Net with no user set-up."""
import os
import subprocess
import sys

from nnunetv2_gfscreen.ext_trainer_env import ENV_VAR, SHIM_FOLDER, register_ext_trainer_folder


def test_register_appends_and_keeps_user_value():
    env = {ENV_VAR: "/my/trainers"}
    register_ext_trainer_folder(env)
    assert env[ENV_VAR].split(os.pathsep) == ["/my/trainers", SHIM_FOLDER]
    register_ext_trainer_folder(env)  # idempotent
    assert env[ENV_VAR].split(os.pathsep) == ["/my/trainers", SHIM_FOLDER]
    empty = {}
    register_ext_trainer_folder(empty)
    assert empty[ENV_VAR] == SHIM_FOLDER


def test_fresh_interpreter_finds_trainers_through_nnunet_lookup():
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    code = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f;"
            "from nnunetv2_gfscreen.trainers import GFScreenTrainer as G;"
            "c = f('GFScreenTrainer'); print(c is G, f('GFScreenTrainer_Tiny').__name__)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "True GFScreenTrainer_Tiny"
