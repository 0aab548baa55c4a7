"""benchmarks/bench_commands.py and command_probe.py: the plain nnU-Net twin of a GF-Screen model, the probe's
entry points and gate counts, and the figures the benchmark derives (hand-computed)."""
import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path

import nibabel
import numpy as np
import pytest
import torch

from gfscreen_lab.experiments.runner import DEMO_MODEL_DIR, FULL, GFSCREEN_MODEL_FOLDER

REPO = Path(__file__).resolve().parents[1]
MODEL = DEMO_MODEL_DIR / GFSCREEN_MODEL_FOLDER


def _load(name: str):
    sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts import their neighbours (timing.py)
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probe_runs_the_installed_console_scripts():
    probe = _load("command_probe")
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    for name, target in probe.ENTRY_POINTS.items():
        assert scripts[name] == target, name


def test_plain_model_holds_the_focus_weights_under_plain_names(tmp_path):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    bc = _load("bench_commands")
    plain = tmp_path / "nnUNetTrainer__nnUNetPlans__3d_fullres_gfscreen"
    bc.make_plain_model(MODEL, plain)
    p = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    p.initialize_from_trained_model_folder(str(plain), (0,), "checkpoint_final.pth")
    assert p.trainer_name == "nnUNetTrainer" and type(p.network) is PlainConvUNet
    assert p.allowed_mirroring_axes == (0, 1, 2)
    weights = torch.load(MODEL / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                         weights_only=False)["network_weights"]
    focus = {k[len("focus."):]: v for k, v in weights.items() if k.startswith("focus.")}
    state = p.network.state_dict()
    assert set(state) == set(focus) and all(torch.equal(state[k], focus[k]) for k in focus)
    with pytest.raises(ValueError, match="focus"):
        bad = tmp_path / "bad"
        (bad / "fold_0").mkdir(parents=True)
        torch.save({"network_weights": focus, "init_args": {}}, bad / "fold_0" / "checkpoint_final.pth")
        bc.make_plain_model(bad, tmp_path / "bad_plain")


def test_probe_counts_each_tile_once_through_mirrored_copies():
    import nnunetv2_gfscreen.core.network as network
    from tests.toy_models import PATCH, toy_network
    probe = _load("command_probe")
    original = network.select_tiles
    net = toy_network(offset=0.0, threshold=0.0)
    x = torch.zeros((3, 1, *PATCH))
    x[0] += 1.0   # mean intensity 1 -> logit 10 > 0: selected
    x[1] -= 1.0   # logit -10: rejected
    x[2, :, :8] += 1.0  # mean 0.5 -> logit 5: selected
    with probe.counting_gate({}) as record, torch.no_grad():
        net(x)
        net(torch.flip(x, (2,)))  # nnU-Net's TTA: a flipped copy reuses the decision, no Glance pass
    assert record == {"gate_tiles_scored": 3, "gate_tiles_selected": 2}
    assert network.select_tiles is original


def test_report_phases_and_label_differences(tmp_path):
    bc = _load("bench_commands")
    reports = tmp_path / "reports"
    reports.mkdir()
    for i, (sel, glance) in enumerate(((1, 0.2), (3, 0.4))):
        (reports / f"case{i}.json").write_text(json.dumps(
            {"preprocess_seconds": 1.0 + i, "glance_seconds": glance, "focus_seconds": 2.0, "sliding_window_seconds": 3.0,
             "export_seconds": 0.5, "total_seconds": 5.0 + i, "tiles_selected": sel, "tiles_total": 10}))
    p = bc.report_phases(reports)
    assert p["cases"] == 2 and p["preprocess"] == 1.5 and p["export"] == 0.5 and p["case_total"] == 5.5
    assert p["glance"] == pytest.approx(0.3) and p["selection_ratio"] == 0.2   # (1 + 3) / 20 tiles
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    mask = np.zeros((4, 5, 6), dtype=np.uint8)
    other = mask.copy()
    other[0, 0, :3] = 1
    nibabel.save(nibabel.Nifti1Image(mask, np.eye(4)), str(a / "case0.nii.gz"))
    nibabel.save(nibabel.Nifti1Image(other, np.eye(4)), str(b / "case0.nii.gz"))
    assert bc.label_differences(a, b) == 3 and bc.label_differences(a, a) == 0


def _row(key, tta, wall, rss, **extra):
    return {"key": key, "command": key, "tta": tta, "cases": 8, "wall_seconds": wall, "seconds_per_case": wall / 8,
            "peak_rss_mib": rss, "peak_gpu_memory_gib": None, "startup_seconds": 4.0, "model_loading_seconds": 1.0,
            "run_seconds": wall - 4.5, "exit_seconds": 0.5, "label_voxels_differing_from_a": 0, **extra}


def test_verdict_glance_share_and_table():
    bc = _load("bench_commands")
    phases = lambda glance, focus: {"preprocess": 0.1, "glance": glance, "focus": focus, "export": 0.1,  # noqa: E731
                                    "case_total": 1.0, "sliding_window": glance + focus}
    rows = [_row("a", False, 100.0, 1200.0), _row("c", False, 10.0, 1300.0, phases=phases(0.5, 0.2),
                                                   pipeline_seconds=4.0, selection_ratio=0.05),
            _row("d", False, 40.0, 1250.0, phases=phases(0.0, 5.0), pipeline_seconds=30.0),
            _row("a", True, 800.0, 1200.0), _row("c", True, 100.0, 1100.0, phases=phases(0.5, 1.0),
                                                 pipeline_seconds=90.0, selection_ratio=0.05)]
    for row in rows:
        ref = next(x for x in rows if x["key"] == "a" and x["tta"] == row["tta"])
        row["speedup_vs_a"] = ref["wall_seconds"] / row["wall_seconds"]
    v = bc.verdict(rows)
    assert v["speedup_tta_off"] == {"value": 10.0, "target": 10.0, "met": True}
    assert v["speedup_tta_on"]["value"] == 8.0 and not v["speedup_tta_on"]["met"]
    assert not v["peak_memory_c_tta_off"]["met"] and v["peak_memory_c_tta_on"]["met"]
    assert bc.glance_share(rows) == {"tta_off": 0.1}   # 0.5 s of Glance over 5 s of dense Focus
    text = bc.table({"rows": rows})
    assert "| (c) c | off | 10.00 | 1.25 | 10.0 | 5.0 | 1300 | 0 |" in text
    # (c) TTA off: run 5.5 s = model loading 1 + pipeline 4 + rest 0.5
    assert "| (c) | off | 4.00 | 1.00 | 4.00 | 0.50 | 0.50 |" in text
    assert "| (d) | off | 0.10 | 0.00 | 5.00 | 0.10 | 1.00 |" in text
    assert FULL.num_test == bc.DEMO_CASES.num_cases and bc.DEMO_CASES.seed == FULL.seed
