"""`python -m gfscreen_lab.experiments.demo`: the whole GF-Screen idea on synthetic CT,
on the CPU, in one command.

Synthetic dataset (conspicuous lesions: a CPU cannot train long enough for realistic ones) ->
either the small model that ships in the repository (trained by `benchmarks/learning_check.py`, see
gfscreen_lab/demo_model/MODEL.md) or, with `--train`, nnU-Net plan and preprocess, a GF-Screen
configuration shrunk for CPU speed and training from scratch (the trainer calibrates the gate on its
validation cases) -> predict the test cases dense and gated -> evaluate both, with a picture per case
(views through every lesion the gate or the Focus missed) -> one comparison table, the gate's lesion
coverage next to a random gate's, the same per lesion-size bin, the calibration's certified level and the
targets of a gate that loses no lesion. Every step runs the user-facing command line in a child process,
with its output streamed, so what the demo prints is what a user would see.

Re-running skips the dataset, preprocessing and training when they are complete (training resumes
from `checkpoint_latest.pth` when interrupted); prediction and evaluation always run again, so
the printed table is always measured on the spot. The steps are the experiment runner's (runner.py).
"""
import argparse
import os
import time
from dataclasses import asdict
from pathlib import Path

from nnunetv2_gfscreen.evaluation.tables import format_comparison_table
from gfscreen_lab.experiments.results_files import machine_description
from gfscreen_lab.experiments.runner import DEMO_MODEL_DIR, FULL, GFSCREEN_MODEL_FOLDER, QUICK, DemoSettings, Runner
from gfscreen_lab.experiments.screening import (calibration_lines, calibration_summary, check_targets, rates,
                                               set_counts, size_table, verdict)


def gate_table(gate: dict) -> str:
    """Markdown: the Glance gate on the test tiles, next to a random gate with the same selection ratio."""
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}"
    rows = [("Glance gate (stored threshold)", gate["selection_ratio"], gate["voxel_coverage"],
             gate["lesion_coverage"]),
            ("random gate, same tiles per case", gate["selection_ratio"], gate["random_voxel_coverage"],
             gate["random_lesion_coverage"])]
    lines = ["| gate | selection ratio % (all tiles pooled) | lesion-voxel coverage % | lesions covered % |",
             "|---|---|---|---|"]
    lines += [f"| {n} | {pct(s)} | {pct(v)} | {pct(c)} |" for n, s, v, c in rows]
    auc = "n/a" if gate["tile_auc"] is None else f"{gate['tile_auc']:.3f}"
    lines += ["", f"Tile AUC (lesion tiles vs the rest) {auc}; on these test cases the Glance's scores would need "
                  f"{pct(gate['oracle_selection_for_target'])}% of the tiles for {100 * gate['oracle_target']:.0f}% "
                  f"of the lesions covered (a threshold picked on the test cases themselves: a bound, not a result)."]
    return "\n".join(lines) + "\n"


def run_demo(root: Path, settings: DemoSettings, device: str = "cpu", train: bool = False) -> dict:
    """The demo pipeline; returns what results.json holds. Without `train` the shipped model predicts
    (settings must then be FULL: the model was trained on data of these generator settings)."""
    root.mkdir(parents=True, exist_ok=True)
    r = Runner(root, settings, device)
    r.say(f"GF-Screen demo in {r.root} ({'quick' if settings is QUICK else 'full'} settings, device {device}, "
          f"{'training from scratch' if train else 'shipped model'})")
    r.make_dataset()
    r.boost_lesions()
    if train:
        r.plan_and_preprocess()
        r.train(settings.trainer)
    else:
        r.install_model(DEMO_MODEL_DIR / GFSCREEN_MODEL_FOLDER, settings.trainer)
    runs = r.predict_and_evaluate(settings.trainer)
    labels = {"dense": "nnU-Net sliding window (dense)", "gated": "GF-Screen (Glance-gated)"}
    table = format_comparison_table({labels[k]: v for k, v in runs.items()})
    gate = runs["gated"]["gate"]
    table += "\nThe gate on the test tiles (coverage: a lesion counts when >= 90% of its voxels lie in selected " \
             "tiles):\n\n" + gate_table(gate)
    figures = rates(set_counts(runs))
    table += ("\nPer lesion-size bin (ground-truth lesion volume):\n\n"
              + size_table([(f"seed {settings.seed}", figures)]))
    calibration = calibration_summary(r.calibration_record(settings.trainer))
    targets = check_targets(figures, shifted=False)
    origin = "trained on the CPU here" if train else \
        f"the shipped model ({DEMO_MODEL_DIR / 'MODEL.md'} says how it was trained)"
    notes = [f"{settings.num_test} synthetic test cases of {list(settings.shape)} voxels (seed {settings.seed}), "
             f"lesions raised by {settings.lesion_boost_hu:g} HU (conspicuous: a CPU cannot train long enough for "
             f"realistic ones); model {settings.trainer}, fold 0, {origin}.",
             f"Gate rule calibrated at the end of training on the fold's validation cases, aiming at lesion-level "
             f"sensitivity {settings.target_sensitivity}; what those cases certify:", *calibration_lines(calibration),
             *(f"Target {name}: {verdict(t['met'])} ({t['value']})" for name, t in targets.items()),
             "The comparison table's selection ratio is the mean of the cases' ratios; the gate table pools all tiles.",
             "Seconds per case: read, preprocess, sliding window, export and write of one case, cases predicted "
             "one after another (-npp 0 -nps 0), measured by the predictor on this machine.",
             f"Per-case pictures (three views, tiles shaded by Glance score, selected tiles outlined, ground truth "
             f"and prediction outlined; a further row through every lesion the gate or the Focus missed, outlined "
             f"in red): {r.root / 'predictions' / 'gated' / 'figures'}/; JSON reports: "
             f"{r.root / 'predictions'}/{{dense,gated}}/reports/."]
    machine = machine_description()
    result = {"settings": asdict(settings), "device": device, "machine": machine, "step_seconds": r.step_seconds,
              "runs": runs, "rates": figures, "targets": targets, "calibration": calibration, "table_markdown": table}
    r.write_results("results", "GF-Screen demo results", "GF-Screen vs dense nnU-Net inference on the held-out "
                    "synthetic cases (all numbers measured just now):\n\n", result, table, asdict(settings), notes)
    return result


def demo_entry_point() -> None:
    parser = argparse.ArgumentParser(prog="python -m gfscreen_lab.experiments.demo",
                                     description="GF-Screen demo on synthetic CT: generate test cases, take the "
                                                 "shipped model (or train one on the CPU with --train), predict "
                                                 "dense and gated, evaluate, print one comparison table.")
    parser.add_argument("-o", type=str, default="demo_output", help="output folder. Default: ./demo_output")
    parser.add_argument("--quick", action="store_true", default=os.environ.get("GFSCREEN_DEMO_QUICK", "0") == "1",
                        help="tiny smoke version (a few minutes; also GFSCREEN_DEMO_QUICK=1); writes into <o>/quick")
    parser.add_argument("--train", action="store_true",
                        help="train the model from scratch (about 45 minutes on 2 CPU cores) instead of using the "
                             "small model that ships in the repository; --quick always trains its tiny model")
    parser.add_argument("-device", type=str, default="cpu", choices=("cpu", "cuda"), help="Default: cpu")
    args = parser.parse_args()
    root = Path(args.o) / "quick" if args.quick else Path(args.o) / ("trained" if args.train else "")
    t0 = time.perf_counter()
    run_demo(root, QUICK if args.quick else FULL, args.device, train=args.train or args.quick)
    print(f"demo finished in {(time.perf_counter() - t0) / 60:.1f} minutes")


if __name__ == "__main__":
    demo_entry_point()
