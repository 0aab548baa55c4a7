"""`bash benchmarks/gpu_check.sh --smoke`: the GPU check's code, run on the CPU on tiny data, end to end.

It runs the way the GPU machine runs it: without SimpleITK (blocked here; the script must fall back to its
stand-in and read/write NIfTI through NibabelIO) and without the packages the carried wheels leave out.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel
import numpy as np

REPO = Path(__file__).resolve().parents[1]
# not carried to the GPU machine (benchmarks/gpu_wheels.sh): blocked so that the check cannot depend on them
NOT_CARRIED = ("SimpleITK", "imagecodecs", "yacs", "graphviz", "future", "unittest2", "pydantic")
PREDICTORS = ("stock dense", "stock gated", "ours dense", "ours gated")


def test_gpu_check_smoke_writes_every_field(tmp_path):
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for name in NOT_CARRIED:
        (blocked / f"{name}.py").write_text(f"raise ImportError('{name} is not on the GPU machine')\n")
    out = tmp_path / "check"
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update(PYTHON=sys.executable, PYTHONPATH=str(blocked), OMP_NUM_THREADS="2", OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "simpleitk_stub" in proc.stdout  # SimpleITK was missing and the stand-in was used
    r = json.loads((out / "gpu_check.json").read_text())

    assert r["profile"] == "smoke" and r["plans"]["patch_size"] == [16, 32, 32]
    assert set(r["stages"]) == {"data_seconds", "plan_seconds", "train_seconds", "inference_seconds",
                                "commands_seconds", "total_seconds"}
    for trainer in ("nnUNetTrainer_GPUCheck", "GFScreenTrainer_GPUCheck"):
        t = r["training"][trainer]
        assert len(t["epochs"]) == 2 and t["seconds_per_iteration"] > 0 and t["epoch_seconds_extrapolated"] > 0
        assert t["compile"] is False and "peak_gpu_memory_gib" not in t  # CPU: nnU-Net does not compile
    fv = r["training"]["GFScreenTrainer_GPUCheck"]["final_validation"]
    assert len(fv["compiled_graphs_per_case"]) == 2 and fv["recompilations_after_first_case"] == 0  # 2 val cases
    assert math.isfinite(fv["threshold"]) and fv["threshold"] != 0.0   # calibrated (a logit) before the validation

    inf = r["inference"]
    assert inf["skipped"] == []
    assert sorted((row["predictor"], row["tta"]) for row in inf["one_case"]) == \
        sorted((p, tta) for p in PREDICTORS for tta in (True, False))
    for row in inf["one_case"]:
        assert row["total"] >= row["sliding_window"] > 0 and row["preprocess"] > 0 and row["export"] > 0
        if row["predictor"] == "ours dense":
            assert row["selection_ratio"] == 1.0
        elif row["predictor"].endswith("gated"):
            # the gate forced to about 17% of this CT's tiles (stock: the Glance scores each mirror copy alone)
            assert 0.05 <= row["selection_ratio"] <= 0.35, row
    assert sorted(row["predictor"] for row in inf["folder"]) == sorted(PREDICTORS)
    assert all(row["cases"] == 2 and row["seconds"] > 0 for row in inf["folder"])
    for name in PREDICTORS:
        masks = list((out / "work" / f"folder_{name.replace(' ', '_')}").glob("*.nii.gz"))
        assert len(masks) == 2, name
    assert all(v is not None and v > 0 for v in inf["speedups"].values())

    # the whole commands (bench_commands.py's table), each a fresh process, on the 2 test cases
    c = r["commands"]
    assert c["skipped"] == [] and c["cases"] == 2
    assert sorted((row["key"], row["tta"]) for row in c["rows"]) == sorted((k, t) for k in "abcd" for t in (False, True))
    n_voxels = sum(np.asarray(nibabel.load(str(m)).dataobj).size
                   for m in (out / "work" / "commands" / "a_tta0").glob("*.nii.gz"))
    assert n_voxels > 0
    for row in c["rows"]:
        assert row["wall_seconds"] > row["startup_seconds"] > 0 and row["model_loading_seconds"] > 0
        assert row["peak_rss_mib"] > 0 and row["peak_gpu_memory_gib"] is None and row["speedup_vs_a"] > 0
        assert row["phases"]["case_total"] > 0   # (a), (b) in-process, (c), (d) from the reports
        if row["key"] == "d":  # the same Focus on the same tiles: equal masks, up to the float rounding of another
            # batch composition, which flips a voxel here and there where this two-epoch Focus sits at a tie
            assert row["label_voxels_differing_from_a"] <= 1e-3 * n_voxels and row["selection_ratio"] == 1.0
        elif row["key"] in "bc":
            assert 0.05 <= row["selection_ratio"] <= 0.5, row   # the forced threshold (and for (c) the floor)
    assert "| (c) nnUNetv2_predict_gfscreen (gated) | on |" in c["table"]
    for key in "abcd":
        assert len(list((out / "work" / "commands" / f"{key}_tta1").glob("*.nii.gz"))) == 2, key

    assert set(r["verdict"]) == {"epoch_time_ratio", "epoch_time_ok", "one_case_tta_speedup", "one_case_ok",
                                 "folder_speedup", "folder_ok", "command_tta_speedup", "command_ok",
                                 "recompilations_after_warmup", "recompilation_ok"}
    assert r["table"] in proc.stdout and "targets:" in r["table"] and c["table"] in r["table"]
