"""The method benchmark: does the Glance gate (few tiles to the Focus, no lesion lost) on held-out cases?

Not a test. Trains GF-Screen from scratch on synthetic cases (`GFScreenTrainer_DemoLong`, 80 x 20
iterations, seed 0; the trainer calibrates the gate on its validation cases at the end), or takes a trained
model folder (`--model`), then predicts held-out test sets that neither training nor calibration saw, dense
and gated:

- seed0: the benchmark's own test cases (seed 0, the training seed; cases after the training cases);
- seed1_demo: the demo's test cases (seed 1);
- seed2: a further seed;
- shifted: another site's scanner (`--shift other_site` of the generator: other spacing, noise, blur, HU
  offset and contrast, body habitus; seed 3).

For each set it prints dense and gated lesion-level sensitivity, DSC and false positives per case, the
selection ratio, the lesions the selected tiles cover next to a random gate with the same number of tiles per
case (tile overlap makes a random gate look good: it is the baseline to beat), the same per lesion-size bin,
the fallback cases and the tiles the floor and border growth added (the reports' gate blocks); the unshifted
sets also pooled; the calibration's certified level and leave-one-case-out figures; and the issue's targets
as met / MISSED lines (unshifted: selection <= 15%, gated lesion-level sensitivity >= dense - 2 points pooled
and in every size bin with >= 5 lesions, gated DSC >= dense - 1 point, gated FP per case <= dense; shifted:
gated >= dense - 5 points). Every set's lesions are raised by `--lesion_boost_hu` inside their label, as the
training cases' were: on 2 CPU cores the Focus cannot learn realistic lesions in the time.

  python benchmarks/learning_check.py -o learning_check_output          # about 50 minutes on 2 CPU cores
  python benchmarks/learning_check.py -o learning_check_output --export_demo_model   # and ship the model
  python benchmarks/learning_check.py -o lc_shipped --model gfscreen_lab/demo_model/GFScreenTrainer_DemoLong__nnUNetPlans__3d_fullres_gfscreen
  python benchmarks/learning_check.py -o lc_arm --set glance_dense_weight=0        # an ablation arm

Prints the tables and writes <o>/learning_check.json (and .md). `--export_demo_model` also writes the trained
model (weights, plans, calibration) to gfscreen_lab/demo_model/, which the demo uses.
"""
import argparse
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the lab (not installed)
from gfscreen_lab.experiments.results_files import machine_description  # noqa: E402
from gfscreen_lab.experiments.runner import (DEMO_MODEL_DIR, FULL, GFSCREEN_CONFIGURATION,  # noqa: E402
                                             GFSCREEN_MODEL_FOLDER, Runner, TestSet)
from gfscreen_lab.experiments.screening import (calibration_lines, calibration_summary, check_targets,  # noqa: E402
                                               pool_counts, rates, set_counts, sets_table, size_table, verdict)

# the demo's generator settings and trainer, with the seed and size the shipped model was trained on
SETTINGS = replace(FULL, dataset_id=904, num_test=6, seed=0)
# the shifted set keeps about the reference field of view along z (48 slices of 1.5-2 mm against 32 of 2.5-3 mm)
SHIFTED_SHAPE = (48, 160, 160)
TEST_SETS = (
    TestSet("seed0", 941, SETTINGS.seed, SETTINGS.num_train, SETTINGS.num_test, SETTINGS.shape,
            description="the benchmark's own test cases (training seed 0, after the training cases)"),
    TestSet("seed1_demo", 942, FULL.seed, FULL.num_train, FULL.num_test, FULL.shape,
            description="the demo's test cases (seed 1)"),
    TestSet("seed2", 943, 2, SETTINGS.num_train, 8, SETTINGS.shape, description="a further seed (2)"),
    TestSet("shifted", 944, 3, SETTINGS.num_train, 8, SHIFTED_SHAPE, shift="other_site",
            description="another site's scanner (seed 3, generator --shift other_site)"),
)
POOLED = "unshifted, pooled"
# nnU-Net's checkpoint keys that its predictor reads, plus our calibration
SHIPPED_KEYS = ("network_weights", "trainer_name", "init_args", "inference_allowed_mirroring_axes",
                "gfscreen_calibration")


def training_minutes(fold_folder: Path) -> float:
    """Wall-clock minutes from the first epoch's start to the last epoch's end (nnU-Net's own timestamps)."""
    logging = torch.load(fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)["logging"]
    return (logging["epoch_end_timestamps"][-1] - logging["epoch_start_timestamps"][0]) / 60


def export_model(fold_folder: Path, destination: Path, note: str) -> Path:
    """A slim copy of a trained fold (what the predictors read, nothing to resume training) for the demo."""
    model = destination / GFSCREEN_MODEL_FOLDER
    if model.is_dir():
        shutil.rmtree(model)
    (model / "fold_0").mkdir(parents=True)
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        shutil.copy2(fold_folder.parent / name, model / name)
    checkpoint = torch.load(fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    torch.save({k: checkpoint[k] for k in SHIPPED_KEYS if k in checkpoint}, model / "fold_0" / "checkpoint_final.pth")
    (destination / "MODEL.md").write_text(note)
    return model


def model_trainer(model: Path) -> str:
    """The trainer of a model folder `<trainer>__nnUNetPlans__3d_fullres_gfscreen` holding fold_0's final
    checkpoint (what `--model` takes)."""
    parts = model.name.split("__")
    if len(parts) != 3 or parts[1:] != ["nnUNetPlans", GFSCREEN_CONFIGURATION]:
        raise SystemExit(f"--model must be a model folder named <trainer>__nnUNetPlans__{GFSCREEN_CONFIGURATION}, "
                         f"got {model}")
    if not (model / "fold_0" / "checkpoint_final.pth").is_file() or not (model / "plans.json").is_file():
        raise SystemExit(f"{model} holds no plans.json and fold_0/checkpoint_final.pth")
    return parts[0]


def select_sets(keys) -> list:
    unknown = sorted(set(keys or ()) - {ts.key for ts in TEST_SETS})
    if unknown:
        raise SystemExit(f"unknown test set(s) {unknown}; choose from {[ts.key for ts in TEST_SETS]}")
    return [ts for ts in TEST_SETS if not keys or ts.key in keys]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", type=str, default="learning_check_output", help="output folder")
    parser.add_argument("-device", type=str, default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--model", type=str, default=None,
                        help=f"evaluate this trained model folder (<trainer>__nnUNetPlans__{GFSCREEN_CONFIGURATION}, "
                             f"e.g. {DEMO_MODEL_DIR / GFSCREEN_MODEL_FOLDER}) instead of training one")
    parser.add_argument("--export_demo_model", action="store_true",
                        help=f"write the trained model to {DEMO_MODEL_DIR} for the demo")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="GF-Screen settings for an ablation arm, on top of the demo's (e.g. glance_dense_weight=0)")
    parser.add_argument("--trainer", type=str, default=SETTINGS.trainer,
                        help="the trainer to train: GFScreenTrainer_DemoLong (the method) or an ablation arm on the "
                             "same schedule, <arm>_DemoLong (gfscreen_lab/trainers.py, e.g. "
                             "GFScreenTrainer_DenseOnly_DemoLong); GFScreenTrainer_Demo and <arm>_Demo are the same "
                             f"at a quarter of the iterations. Default: {SETTINGS.trainer}")
    parser.add_argument("--lesion_boost_hu", type=float, default=SETTINGS.lesion_boost_hu,
                        help="HU added inside the lesion label of every training and test image; a --model must have "
                             f"been trained with the same. Default: {SETTINGS.lesion_boost_hu:g}")
    parser.add_argument("--sets", nargs="+", default=None, metavar="KEY",
                        help=f"only these test sets (of {', '.join(ts.key for ts in TEST_SETS)}). Default: all")
    args = parser.parse_args()
    if args.model and (args.set or args.export_demo_model or args.trainer != SETTINGS.trainer):
        parser.error("--model evaluates a trained model: it takes no --set or --trainer arm and exports nothing")
    if args.trainer != SETTINGS.trainer and args.export_demo_model:
        parser.error("an ablation arm (--trainer) is not the demo's model; drop --export_demo_model")
    t0 = time.perf_counter()
    root = Path(args.o)
    root.mkdir(parents=True, exist_ok=True)
    settings = replace(SETTINGS, lesion_boost_hu=args.lesion_boost_hu)
    if args.set:
        overrides = dict(kv.split("=", 1) for kv in args.set)
        settings = replace(settings, gfscreen_settings={**settings.gfscreen_settings, **overrides})
        if args.export_demo_model:
            parser.error("an ablation arm (--set) is not the demo's model; drop --export_demo_model")
    test_sets = select_sets(args.sets)
    r = Runner(root, settings, args.device)
    if args.model:
        trainer = model_trainer(Path(args.model))
        r.install_model(Path(args.model).resolve(), trainer)
        train_minutes = None
    else:
        trainer = args.trainer
        r.make_dataset()
        r.boost_lesions()
        r.plan_and_preprocess()
        r.train(trainer)
        train_minutes = (time.perf_counter() - t0) / 60

    per_set = {}
    for ts in test_sets:
        raw = r.make_test_set(ts)
        runs = r.predict_and_evaluate(trainer, raw, root / "predictions" / ts.key)
        per_set[ts.key] = {"test_set": asdict(ts), "runs": runs, "counts": set_counts(runs)}
    rows = [(ts.key, rates(per_set[ts.key]["counts"])) for ts in test_sets]
    unshifted = [ts.key for ts in test_sets if not ts.shift]
    if len(unshifted) > 1:
        rows.append((POOLED, rates(pool_counts([per_set[k]["counts"] for k in unshifted]))))
    shifted = {ts.key for ts in test_sets if ts.shift}
    targets = {label: check_targets(r_, label in shifted) for label, r_ in rows}
    calibration = calibration_summary(r.calibration_record(trainer))
    table = ("Dense vs gated on each held-out test set (gate coverage: a lesion counts when >= 90% of its voxels "
             "lie in selected tiles; random gate: as many tiles per case, chosen at random):\n\n" + sets_table(rows)
             + "\nPer lesion-size bin (ground-truth lesion volume):\n\n" + size_table(rows))
    target_lines = [f"{name}: " + "; ".join(f"{label} {verdict(t[name]['met'])} ({t[name]['value']})"
                                             for label, t in targets.items() if name in t)
                    for name in dict.fromkeys(n for t in targets.values() for n in t)]
    gate_lines = [f"{key}: tile AUC {_auc(s['runs'])}; the Glance's scores would need "
                  f"{_pct(s['runs']['gated']['gate']['oracle_selection_for_target'])}% of the tiles to cover 98% of "
                  f"these lesions (threshold picked on the test cases: a bound)" for key, s in per_set.items()]
    notes = ([f"{ts.key}: {ts.num_cases} cases of {list(ts.shape)} voxels, {ts.description}" for ts in test_sets]
             + [f"Model: {args.model or f'{trainer} trained here (fold 0, seed {settings.seed})'}; lesions of every "
                f"set raised by {settings.lesion_boost_hu:g} HU."]
             + calibration_lines(calibration) + gate_lines + ["Targets: " + line for line in target_lines])
    result = {"settings": asdict(settings), "device": args.device, "model": args.model, "trainer": trainer,
              "machine": machine_description(), "minutes": (time.perf_counter() - t0) / 60,
              "train_minutes_incl_dataset": train_minutes, "sets": per_set,
              "rates": dict(rows), "targets": targets, "calibration": calibration, "table_markdown": table}
    r.write_results("learning_check", "GF-Screen method benchmark", "GF-Screen on held-out test sets (all numbers "
                    "measured just now):\n\n", result, table, asdict(settings), notes)
    if args.export_demo_model:
        fold = r.fold_folder(trainer)
        note = (f"# The demo's shipped model\n\nTrained by `python benchmarks/learning_check.py -o {args.o} "
                f"--export_demo_model` on {result['machine']}; training took {training_minutes(fold):.0f} minutes "
                f"(`{trainer}`, fold 0, seed {settings.seed}: "
                f"{settings.num_train} synthetic training cases of {list(settings.shape)} voxels, lesions raised "
                f"by {settings.lesion_boost_hu:g} HU). The demo predicts test cases generated afresh with seed "
                f"{FULL.seed}, which this model never saw. Only what the predictors read is kept "
                f"({', '.join(SHIPPED_KEYS)}); nothing to resume training from.\n\nHeld-out figures of this "
                f"model:\n\n{table}\n" + "\n".join(f"- {n}" for n in notes) + "\n")
        path = export_model(fold, DEMO_MODEL_DIR, note)
        print(f"model written to {path} ({sum(f.stat().st_size for f in path.rglob('*') if f.is_file()) / 1e6:.1f} MB)")
    print(f"benchmark finished in {result['minutes']:.1f} minutes")


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def _auc(runs: dict) -> str:
    auc = runs["gated"]["gate"].get("tile_auc")
    return "n/a" if auc is None else f"{auc:.3f}"


if __name__ == "__main__":
    main()
