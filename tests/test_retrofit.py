"""Retrofit: a plain nnU-Net model trained by the stock CLI gets a Glance; its Focus stays exactly the original.

One tiny plain model (nnUNetTrainer_ShortCPU: nnUNetTrainer, 2 x 2 iterations, CPU plans) is trained through `nnUNetv2_train`, retrofitted through
`nnUNetv2_gfscreen_retrofit`, and predicted by the stock predictor and ours.
"""
import json
import shutil

import numpy as np
import pytest
import torch

from gfscreen_lab.experiments.cpu_plans import CPU_ARCH_KWARGS, shrink_configuration_for_cpu
from tests.nnunet_fixtures import DATASET_ID, PATCH, run_cli, training_env

PLANS = "nnUNetPlansRetro"
SOURCE_TR = "nnUNetTrainer_ShortCPU"   # plain nnUNetTrainer, 2 x 2 iterations (gfscreen_lab/trainers.py)
RETRO_TR = "GFScreenTrainer_Retrofit_Tiny"
CONFIG = "3d_fullres"


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def retrofitted(planned_dataset):
    """Plain model (stock CLI, stock trainer) -> nnUNetv2_gfscreen_retrofit, on a plans copy with a CPU-sized 3d_fullres."""
    pre = planned_dataset["dataset_folder"]
    plans = json.loads(planned_dataset["plans_file"].read_text())
    plans = shrink_configuration_for_cpu(plans, CONFIG, PATCH, CPU_ARCH_KWARGS, batch_size=2)
    plans["plans_name"] = PLANS
    plans["configurations"] = {CONFIG: plans["configurations"][CONFIG]}   # no gfscreen block: default settings
    (pre / f"{PLANS}.json").write_text(json.dumps(plans, indent=2))
    env = {**training_env(planned_dataset["env"]), "nnUNet_def_n_proc": "1"}   # no export pool of 8 processes
    run_cli(["nnUNetv2_train", str(DATASET_ID), CONFIG, "0", "-tr", SOURCE_TR, "-p", PLANS, "-device", "cpu"], env)
    proc = run_cli(["nnUNetv2_gfscreen_retrofit", "-d", str(DATASET_ID), "-c", CONFIG, "-f", "0", "-tr", SOURCE_TR,
                    "-p", PLANS, "-gtr", RETRO_TR, "-device", "cpu"], env)
    results = next((planned_dataset["root"] / "results").glob(f"Dataset{DATASET_ID}_*"))
    return {**planned_dataset, "env": env, "stdout": proc.stdout, "results": results,
            "source": results / f"{SOURCE_TR}__{PLANS}__{CONFIG}",
            "retro": results / f"{RETRO_TR}__{PLANS}__{CONFIG}"}


def test_retrofit_freezes_the_focus_and_trains_the_glance(retrofitted):
    source = _load(retrofitted["source"] / "fold_0" / "checkpoint_final.pth")["network_weights"]
    retro_ckpt = _load(retrofitted["retro"] / "fold_0" / "checkpoint_final.pth")
    weights = retro_ckpt["network_weights"]
    assert retro_ckpt["trainer_name"] == RETRO_TR
    focus = {k[len("focus."):]: v for k, v in weights.items() if k.startswith("focus.")}
    assert set(focus) == set(source)
    assert all(torch.equal(focus[k], source[k]) for k in source), "the Focus changed (seg layers included?)"
    steps = {float(s["step"]) for s in retro_ckpt["gfscreen"]["glance_optimizer_state"]["state"].values()}
    assert steps == {4.0}                                  # 2 epochs x 2 iterations of the Glance's AdamW only
    assert not (retrofitted["retro"] / "fold_0" / "checkpoint_best.pth").exists()
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        assert (retrofitted["retro"] / name).is_file()
    assert (retrofitted["retro"] / "fold_0" / "gfscreen_calibration.json").is_file()
    # one cached prediction per training case of fold 0, beside the preprocessed data
    caches = [p for p in retrofitted["dataset_folder"].glob("*_gfscreen_focus_cache/*/cache.json")
              if str(retrofitted["source"]) in json.loads(p.read_text())["source"]["checkpoint"]]
    assert len(caches) == 1                                # other tests may cache other models' predictions
    splits = json.loads((retrofitted["dataset_folder"] / "splits_final.json").read_text())[0]
    assert {p.stem for p in caches[0].parent.glob("*.npz")} == set(splits["train"])


def _predict(cli, model_args, inputs, out, env, *extra):
    run_cli([cli, "-i", str(inputs), "-o", str(out), "-d", str(DATASET_ID), "-c", CONFIG, "-f", "0", "-p", PLANS,
             "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1", *model_args, *extra], env)


def test_both_predictors_run_it_gated_and_dense_equals_the_original(retrofitted, tmp_path):
    import SimpleITK as sitk
    inputs = tmp_path / "in"
    inputs.mkdir()
    for f in sorted((retrofitted["raw_folder"] / "imagesTs").glob("*_0000.nii.gz")):
        shutil.copy(f, inputs / f.name)
    env = {**retrofitted["env"], "nnUNet_n_proc_DA": "1"}
    _predict("nnUNetv2_predict", ["-tr", SOURCE_TR], inputs, tmp_path / "original", env, "--save_probabilities")
    _predict("nnUNetv2_predict", ["-tr", RETRO_TR], inputs, tmp_path / "stock_gated", env)
    _predict("nnUNetv2_predict_gfscreen", ["-tr", RETRO_TR], inputs, tmp_path / "dense", env, "--dense",
             "--torch_io", "off", "--tile_batch_size", "1", "--save_probabilities")
    _predict("nnUNetv2_predict_gfscreen", ["-tr", RETRO_TR], inputs, tmp_path / "gated", env,
             "--max_selection", "0.5", "--report_dir", str(tmp_path / "reports"))
    cases = sorted(p.name for p in (tmp_path / "original").glob("*.nii.gz"))
    assert cases and cases == sorted(p.name for p in (tmp_path / "stock_gated").glob("*.nii.gz"))
    read = lambda p: sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
    for case in cases:
        assert np.array_equal(read(tmp_path / "original" / case), read(tmp_path / "dense" / case)), case
        stem = case[:-len(".nii.gz")]
        p_orig = np.load(tmp_path / "original" / f"{stem}.npz")["probabilities"]
        p_dense = np.load(tmp_path / "dense" / f"{stem}.npz")["probabilities"]
        np.testing.assert_allclose(p_dense, p_orig, atol=1e-3)
    reports = [json.loads(p.read_text()) for p in (tmp_path / "reports").glob("*.json") if p.stem in
               {c[:-len(".nii.gz")] for c in cases}]
    assert len(reports) == len(cases)
    assert all(r["tiles_selected"] < r["tiles_total"] for r in reports), "the gate skipped no tile"
