"""The install registers our trainers with nnU-Net with no user set-up; the lab registers its own in the processes
that need it; the wheel holds the product and nothing of the lab."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from nnunetv2_gfscreen.ext_trainer_env import ENV_VAR, SHIM_FOLDER, register_ext_trainer_folder

REPO = Path(__file__).resolve().parents[1]


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
            "c = f('GFScreenTrainer'); print(c is G, f('GFScreenTrainer_DiceReward').__name__)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "True GFScreenTrainer_DiceReward"


def test_lab_environment_appends_the_lab_folder_and_keeps_the_product_lookup(tmp_path):
    from gfscreen_lab.ext_trainer_env import LAB_SHIM_FOLDER, REPO_ROOT, lab_environment
    assert lab_environment({ENV_VAR: "/my/trainers", "PYTHONPATH": "/x"}) == \
        {ENV_VAR: os.pathsep.join(["/my/trainers", LAB_SHIM_FOLDER]), "PYTHONPATH": os.pathsep.join([REPO_ROOT, "/x"])}
    again = lab_environment(lab_environment({}))   # idempotent
    assert again == {ENV_VAR: LAB_SHIM_FOLDER, "PYTHONPATH": REPO_ROOT}
    # a fresh interpreter outside the repository, with no nnUNet_extTrainer of its own: the product's trainers come
    # from the install's .pth, the lab's from the lab's folder, each class once under its real module
    env = lab_environment({k: v for k, v in os.environ.items() if k != ENV_VAR})
    code = ("import os; from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f;"
            "from nnunetv2_gfscreen.trainers import GFScreenTrainer as G;"
            "t = f('GFScreenTrainer_Tiny'); print(f('GFScreenTrainer') is G, issubclass(t, G), t.__module__,"
            " os.environ['nnUNet_extTrainer'].split(os.pathsep)[-1] == " + repr(SHIM_FOLDER) + ")")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().splitlines()[-1] == "True True gfscreen_lab.trainers True"


def test_wheel_holds_the_product_and_nothing_of_the_lab(tmp_path):
    """Built offline (setuptools and wheel of the environment, no build isolation) from a copy of this checkout
    without build outputs: pip builds in the source tree, and a stale build/ would leak into the wheel."""
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".whl", "*_output*"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                           "--no-index", "-q", "-w", str(tmp_path / "wheel")], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("nnunetv2_gfscreen-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    parts = {part for name in names for part in name.split("/")}
    assert not [n for n in names if n.startswith("gfscreen_lab")], names
    assert not parts & {"synthetic", "experiments", "demo_model", "gfscreen_lab"}, sorted(parts)
    assert not [n for n in names if n.endswith(".pth") and n != "nnunetv2_gfscreen.pth"], names
    for module in ("nnunetv2_gfscreen/__init__.py", "nnunetv2_gfscreen/ext_trainer_env.py",
                   "nnunetv2_gfscreen/ext_trainer/gfscreen_nnunet_trainers.py", "nnunetv2_gfscreen/trainers/variants.py",
                   "nnunetv2_gfscreen/predictors/cli.py", "nnunetv2_gfscreen/core/network.py", "nnunetv2_gfscreen.pth"):
        assert module in names, module
    entry_points = next(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "nnUNetv2_predict_gfscreen" in entry_points
    assert not [w for w in ("make_dataset", "gfscreen_demo", "gfscreen_ablation", "gfscreen_lab") if w in entry_points]
