"""`python -m gfscreen_lab.experiments.ablation`: the Glance ablation,
re-run on synthetic CT.

Arms (nnunetv2_gfscreen/trainers/variants.py; each changes one thing against the default): the default (GRL +
binary reward + alpha CE + dense map), the dense map alone, the dense map + balanced CE without GRL, GRL without the
dense map, the Dice reward, GRL without the CE term, and groups of 4 instead of 16.
Every arm trains on the same planned dataset (the demo's steps), gets its gate calibrated to the
same lesion-level sensitivity on its validation cases (or a fixed `--threshold`), predicts the test cases
gated and is evaluated; one Markdown table and one JSON hold the results.

`--quick` uses the short variants (gfscreen_lab/trainers.py) and a small dataset for a CPU;
without it the full-length trainers run (nnU-Net's 1000 epochs: a GPU job).
"""
import argparse
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from gfscreen_lab.experiments.results_files import machine_description
from gfscreen_lab.experiments.runner import FULL, DemoSettings, Runner

# (method as in the paper's ablation table, full-length trainer); --quick appends "_Short"
ARMS: Tuple[Tuple[str, str], ...] = (
    ("GRL + binary reward + alpha CE + dense map (default, N=16)", "GFScreenTrainer"),
    ("dense map alone (no GRL, no CE)", "GFScreenTrainer_DenseOnly"),
    ("dense map + balanced CE (no GRL)", "GFScreenTrainer_DenseBalancedCE"),
    ("GRL + binary reward + alpha CE, no dense map", "GFScreenTrainer_NoDenseMap"),
    ("Dice reward instead of binary", "GFScreenTrainer_DiceReward"),
    ("GRL without the CE term", "GFScreenTrainer_NoAlphaCE"),
    ("groups of 4 instead of 16", "GFScreenTrainer_Group4"),
)
QUICK_SUFFIX = "_Short"
ABLATION_FULL = replace(FULL, dataset_id=903, trainer="GFScreenTrainer")
ABLATION_QUICK = DemoSettings(dataset_id=904, num_train=10, num_test=6, shape=(32, 96, 96), patch_size=(16, 48, 48),
                              trainer="GFScreenTrainer" + QUICK_SUFFIX)


def _pct(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


# (column header, aggregate key of nnUNetv2_gfscreen_evaluate's output, formatter)
ABLATION_COLUMNS: Tuple[Tuple[str, str, Callable[[Optional[float]], str]], ...] = (
    ("DSC %", "dsc_mean", _pct),
    ("NSD %", "nsd_mean", _pct),
    ("lesion sensitivity %", "lesion_sensitivity", _pct),
    ("FP per case", "fp_per_case", lambda v: "n/a" if v is None else f"{v:.2f}"),
    ("selection ratio %", "selection_ratio_mean", _pct),
    ("Glance tile sensitivity %", "tile_sensitivity", _pct),
    ("Glance tile specificity %", "tile_specificity", _pct),
)


def select_arms(trainers: Optional[Sequence[str]], quick: bool) -> List[Tuple[str, str]]:
    """(method, trainer name) of the arms to run; `trainers` picks by full-length trainer name."""
    known = {t for _, t in ARMS}
    unknown = sorted(set(trainers or ()) - known)
    if unknown:
        raise ValueError(f"unknown ablation trainer(s) {unknown}; choose from {sorted(known)}")
    chosen = [(m, t) for m, t in ARMS if not trainers or t in trainers]
    return [(m, t + QUICK_SUFFIX if quick else t) for m, t in chosen]


def format_ablation_table(rows: Sequence[Tuple[str, str, dict]]) -> str:
    """Markdown table, one row per (method, trainer, aggregate dict); missing values are n/a."""
    if not rows:
        raise ValueError("format_ablation_table needs at least one row")
    header = ["method", "trainer"] + [c[0] for c in ABLATION_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for method, trainer, agg in rows:
        lines.append("| " + " | ".join([method, f"`{trainer}`"] + [fmt(agg.get(key)) for _, key, fmt in
                                                                    ABLATION_COLUMNS]) + " |")
    return "\n".join(lines) + "\n"


def run_ablation(root: Path, settings: DemoSettings, arms: Sequence[Tuple[str, str]], device: str = "cpu",
                 threshold: Optional[float] = None) -> dict:
    """Train every arm (training calibrates its gate), predict gated (or at a fixed threshold) and evaluate.

    Returns what ablation_results.json holds."""
    root.mkdir(parents=True, exist_ok=True)
    r = Runner(root, settings, device)
    r.log_file = r.root / "ablation_log.txt"
    r.say(f"GF-Screen ablation in {r.root}: {len(arms)} arm(s) on device {device}")
    r.make_dataset()
    r.plan_and_preprocess()
    rows, per_arm = [], {}
    for method, trainer in arms:
        r.train(trainer)  # ends with the gate calibrated on the fold's validation cases
        pred = r.root / "predictions" / trainer
        reports = pred / "reports"
        extra = ["--threshold", threshold] if threshold is not None else []
        r.run("nnUNetv2_predict_gfscreen",
              ["-i", r.raw / "imagesTs", "-o", pred, "-d", settings.dataset_id, "-c", "3d_fullres_gfscreen",
               "-tr", trainer, "-f", 0, "-device", device, "--disable_progress_bar", "-npp", 0, "-nps", 0,
               "--report_dir", reports, *extra], f"predict {trainer}")
        agg = r.evaluate(pred, reports)["aggregate"]
        rows.append((method, trainer, agg))
        per_arm[trainer] = {"method": method, "aggregate": agg}
        r.say("\n" + format_ablation_table(rows))
    table = format_ablation_table(rows)
    gate = (f"fixed gate threshold {threshold}" if threshold is not None else
            f"gate threshold of each arm calibrated on its validation cases to lesion-level sensitivity "
            f"{settings.target_sensitivity}")
    notes = [f"{settings.num_test} synthetic test cases of {list(settings.shape)} voxels, fold 0 models, {gate}.",
             "Selection ratio and Glance tile sensitivity/specificity come from the gated predictor's "
             "per-case reports."]
    machine = machine_description()
    result = {"settings": asdict(settings), "device": device, "threshold": threshold, "machine": machine,
              "step_seconds": r.step_seconds, "arms": per_arm, "table_markdown": table}
    r.write_results("ablation_results", "GF-Screen ablation on synthetic CT", "", result, table, asdict(settings),
                    notes)
    return result


def ablation_entry_point() -> None:
    parser = argparse.ArgumentParser(prog="python -m gfscreen_lab.experiments.ablation",
                                     description="Re-run the GF-Screen Glance ablation on synthetic CT (each arm "
                                                 "changes one thing against the default: the dense map alone, dense "
                                                 "map + balanced CE without GRL, GRL without the dense map, the Dice "
                                                 "reward, no CE term, groups of 4) and write one table.")
    parser.add_argument("-o", type=str, default="demo_output/ablation", help="output folder. "
                                                                             "Default: ./demo_output/ablation")
    parser.add_argument("--quick", action="store_true", help="CPU mode: short trainer variants, small dataset")
    parser.add_argument("-device", type=str, default="cpu", choices=("cpu", "cuda"), help="Default: cpu")
    parser.add_argument("-tr", nargs="+", default=None, metavar="TRAINER",
                        help=f"run only these arms (full-length names): {', '.join(t for _, t in ARMS)}")
    parser.add_argument("--threshold", type=float, default=None,
                        help="fixed gate threshold for every arm instead of calibrating each one")
    args = parser.parse_args()
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise SystemExit(f"--threshold must be in [0, 1], got {args.threshold}")
    try:
        arms = select_arms(args.tr, args.quick)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    t0 = time.perf_counter()
    run_ablation(Path(args.o), ABLATION_QUICK if args.quick else ABLATION_FULL, arms, args.device, args.threshold)
    print(f"ablation finished in {(time.perf_counter() - t0) / 60:.1f} minutes")


if __name__ == "__main__":
    ablation_entry_point()
