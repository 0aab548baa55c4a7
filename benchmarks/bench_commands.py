"""Benchmark: the whole prediction commands a user runs, side by side, on the same cases and the same Focus weights.

Not a test: prints a Markdown table and writes <o>/bench_commands.json and .md. In sequence, each with TTA off
(`--disable_tta`) and on, each a fresh process (interpreter start, imports, model loading, every case, exit):

  (a) stock `nnUNetv2_predict` on a plain nnU-Net model folder: trainer nnUNetTrainer, the same plans, a
      checkpoint_final.pth holding only the GF-Screen model's Focus weights under plain key names (dense nnU-Net);
  (b) stock `nnUNetv2_predict -tr <GF-Screen trainer>`: gated inside the network (the threshold part of the rule);
  (c) `nnUNetv2_predict_gfscreen`: gated by the whole rule (threshold, floor, fallback, border growth);
  (d) `nnUNetv2_predict_gfscreen --dense` (for reference: no Glance).

Cases and model (default): the demo's 8 test cases (seed 1 of the demo's generator settings, lesions raised by
300 HU: `gfscreen_lab.experiments.runner.FULL`) and the shipped model (gfscreen_lab/demo_model/, its calibrated
rule in the checkpoint), installed by the experiment Runner. The shipped model was trained without mirroring;
both benchmark copies of the model get `inference_allowed_mirroring_axes = (0, 1, 2)`, so the TTA-on rows
measure what TTA costs, not how well a mirrored model segments.

Per command: wall seconds, seconds per case, the ratio (a) / command, peak resident memory of its largest process
(`ru_maxrss`, benchmarks/command_probe.py) and on CUDA torch's peak GPU memory, its start-up (interpreter and
imports) and model loading, the share of tiles the Focus saw ((b): counted in the network; (c): its reports), and
the voxels whose label differs from (a)'s. Per phase and case (read+preprocess, Glance, Focus, export): from the
reports for (c) and (d), and for (a) and (b) from an in-process run of nnU-Net's own steps on the same model
folders after the commands (`timing.stock_case_phases`; for (b) the Glance runs inside the sliding window).

  python benchmarks/bench_commands.py -o bench_commands_output                 # CPU, about 20-40 minutes on 2 cores
  python benchmarks/bench_commands.py -o bench_commands_gpu -device cuda
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # the lab (not installed)
from gfscreen_lab.experiments.results_files import machine_description  # noqa: E402
from gfscreen_lab.experiments.runner import (DEMO_MODEL_DIR, FULL, GFSCREEN_CONFIGURATION,  # noqa: E402
                                             GFSCREEN_MODEL_FOLDER, Runner, TestSet)

COMMANDS = {
    "a": "stock nnUNetv2_predict, plain nnU-Net model (dense)",
    "b": "stock nnUNetv2_predict -tr GF-Screen (gated in the network)",
    "c": "nnUNetv2_predict_gfscreen (gated)",
    "d": "nnUNetv2_predict_gfscreen --dense",
}
PLAIN_TRAINER = "nnUNetTrainer"
TTA_AXES = (0, 1, 2)
TARGET_SPEEDUP = 10.0
# the demo's test cases: seed 1, after the 16 training cases of the demo's dataset (as learning_check's seed1_demo)
DEMO_CASES = TestSet("demo", 942, FULL.seed, FULL.num_train, FULL.num_test, FULL.shape,
                     description="the demo's test cases (seed 1)")


@dataclass(frozen=True)
class Setup:
    """Where the commands find their models (nnUNet_results/<dataset_name>/<trainer>__nnUNetPlans__<configuration>,
    the GF-Screen model and its plain twin) and cases, and how they run."""
    results: str
    dataset_name: str
    configuration: str
    gfscreen_trainer: str
    input_folder: str
    device: str = "cpu"
    npp: int = 0
    nps: int = 0
    gfscreen_args: Tuple[str, ...] = ()  # further arguments of nnUNetv2_predict_gfscreen ((c), (d))

    def model_folder(self, trainer: str) -> Path:
        return Path(self.results) / self.dataset_name / f"{trainer}__nnUNetPlans__{self.configuration}"


# ---------------------------------------------------------------------- model folders
def prepare_gfscreen_copy(checkpoint_file: Path, axes=TTA_AXES, rule=None) -> None:
    """Give a benchmark copy of a GF-Screen checkpoint test-time mirroring axes and, when given, another gate rule
    (a `GateRule`)."""
    import torch
    from nnunetv2_gfscreen.core.gate import Gate
    checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
    checkpoint["inference_allowed_mirroring_axes"] = None if axes is None else tuple(axes)
    if rule is not None:
        Gate.write_rule_into_state_dict(checkpoint["network_weights"], rule)
    torch.save(checkpoint, checkpoint_file)


def make_plain_model(gfscreen_model: Path, plain_model: Path, mirroring_axes=TTA_AXES) -> None:
    """A plain nnU-Net model folder from a GF-Screen one: its plans and dataset files, and per fold a checkpoint
    with trainer nnUNetTrainer whose weights are the Focus's (`focus.` stripped from the key names)."""
    import torch
    if plain_model.is_dir():
        shutil.rmtree(plain_model)
    plain_model.mkdir(parents=True)
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        if (gfscreen_model / name).is_file():
            shutil.copy(gfscreen_model / name, plain_model / name)
    for fold in sorted(gfscreen_model.glob("fold_*")):
        checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        focus = {k[len("focus."):]: v for k, v in checkpoint["network_weights"].items() if k.startswith("focus.")}
        if not focus:
            raise ValueError(f"{fold / 'checkpoint_final.pth'} holds no focus.* weights: not a GF-Screen model")
        (plain_model / fold.name).mkdir()
        torch.save({"network_weights": focus, "trainer_name": PLAIN_TRAINER, "init_args": checkpoint["init_args"],
                    "inference_allowed_mirroring_axes": None if mirroring_axes is None else tuple(mirroring_axes)},
                   plain_model / fold.name / "checkpoint_final.pth")



# ---------------------------------------------------------------------- the commands
def command_argv(key: str, setup: Setup, out: Path, tta: bool) -> List[str]:
    """The command line of command `key` (COMMANDS) predicting setup.input_folder into `out`."""
    common = ["-i", setup.input_folder, "-o", str(out), "-d", setup.dataset_name, "-c", setup.configuration,
              "-f", "0", "-device", setup.device, "-npp", str(setup.npp), "-nps", str(setup.nps),
              "--disable_progress_bar", *([] if tta else ["--disable_tta"])]
    if key == "a":
        return ["nnUNetv2_predict", *common, "-tr", PLAIN_TRAINER]
    if key == "b":
        return ["nnUNetv2_predict", *common, "-tr", setup.gfscreen_trainer]
    ours = ["nnUNetv2_predict_gfscreen", *common, "-tr", setup.gfscreen_trainer, "--report_dir", str(out / "reports"),
            *setup.gfscreen_args]
    if key == "c":
        return ours
    if key == "d":
        return [*ours, "--dense"]
    raise ValueError(f"command key must be one of {sorted(COMMANDS)}, got {key!r}")


def run_command(key: str, setup: Setup, out: Path, tta: bool, env: dict, log_dir: Path) -> dict:
    """One command in a fresh interpreter through command_probe.py; its wall seconds and the probe's record."""
    if out.is_dir():
        shutil.rmtree(out)
    argv = command_argv(key, setup, out, tta)
    probe = log_dir / f"probe_{key}_tta{int(tta)}.json"
    launch = [sys.executable, str(HERE / "command_probe.py"), str(probe), *(["--count_gate"] if key == "b" else []),
              "--", *argv]
    log = log_dir / f"{key}_tta{int(tta)}.log"
    t_launch = time.time()
    t0 = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call(launch, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    t_end = t_launch + wall
    if code != 0:
        raise RuntimeError(f"command ({key}) {' '.join(argv)} failed with exit code {code}; see {log}")
    record = json.loads(probe.read_text())
    return {"argv": argv, "wall_seconds": wall, "probe": record,
            "startup_seconds": record["imported"] - t_launch,  # interpreter start and the command's imports
            "model_loading_seconds": record.get("model_loading_seconds"),
            "run_seconds": record["finished"] - record["imported"],  # the entry function
            "exit_seconds": t_end - record["finished"],  # interpreter shutdown
            "peak_rss_mib": max(record["peak_rss_self_mib"], record["peak_rss_children_mib"]),
            "peak_gpu_memory_gib": record["peak_gpu_memory_gib"]}


# ---------------------------------------------------------------------- phases
def report_phases(report_dir: Path) -> dict:
    """Per-case means of the phases in nnUNetv2_predict_gfscreen's reports, and the pooled selection ratio."""
    reports = [json.loads(p.read_text()) for p in sorted(report_dir.glob("*.json"))]
    if not reports:
        raise FileNotFoundError(f"no case reports in {report_dir}")
    n = len(reports)
    mean = lambda key: sum(r[key] for r in reports) / n  # noqa: E731
    return {"cases": n, "preprocess": mean("preprocess_seconds"), "glance": mean("glance_seconds"),
            "focus": mean("focus_seconds"), "sliding_window": mean("sliding_window_seconds"),
            "export": mean("export_seconds"), "case_total": mean("total_seconds"),
            "selection_ratio": sum(r["tiles_selected"] for r in reports) / max(1, sum(r["tiles_total"] for r in reports))}


def stock_phases(model: Path, case_files: Sequence[List[str]], tta: bool, device, work: Path) -> dict:
    """Per-case means of nnU-Net's own steps (read+preprocess, sliding window, export) with `model`, in this
    process (timing.stock_case_phases), as `nnUNetv2_predict` runs them."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from timing import stock_case_phases
    p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=tta,
                        perform_everything_on_device=device.type == "cuda", device=device, allow_tqdm=False)
    p.initialize_from_trained_model_folder(str(model), (0,), "checkpoint_final.pth")
    work.mkdir(parents=True, exist_ok=True)
    rows = [stock_case_phases(p, files, str(work / f"case{i}"), device) for i, files in enumerate(case_files)]
    n = len(rows)
    return {"cases": n, **{k: sum(r[k] for r in rows) / n for k in ("preprocess", "sliding_window", "export")},
            "case_total": sum(r["total"] for r in rows) / n}


def label_differences(reference: Path, other: Path, ending: str = ".nii.gz") -> int:
    """Voxels whose label differs between the masks of two output folders (same case names)."""
    import nibabel
    import numpy as np
    total = 0
    for mask in sorted(reference.glob(f"*{ending}")):
        a = np.asarray(nibabel.load(str(mask)).dataobj)
        b = np.asarray(nibabel.load(str(other / mask.name)).dataobj)
        total += int(np.count_nonzero(a != b))
    return total


# ---------------------------------------------------------------------- the benchmark
def prepare_models(setup: Setup, rule=None) -> None:
    """Turn the GF-Screen model folder where setup's commands look for it into the benchmark's copy
    (prepare_gfscreen_copy: mirroring axes, gate rule), and write its plain nnU-Net twin beside it."""
    gfscreen = setup.model_folder(setup.gfscreen_trainer)
    for checkpoint in gfscreen.glob("fold_*/checkpoint_final.pth"):
        prepare_gfscreen_copy(checkpoint, TTA_AXES, rule)
    make_plain_model(gfscreen, setup.model_folder(PLAIN_TRAINER))


def install_models(setup: Setup, source: Path, rule=None) -> None:
    """Copy the GF-Screen model folder `source` to where setup's commands look for it, then `prepare_models`."""
    target = setup.model_folder(setup.gfscreen_trainer)
    if target.is_dir():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.md"))
    prepare_models(setup, rule)


def prepare(root: Path, test_set: TestSet = DEMO_CASES, device: str = "cpu", npp: int = 0, nps: int = 0):
    """The demo's test cases and the shipped model (with TTA axes) plus its plain nnU-Net twin, through the
    experiment Runner; returns (runner, setup)."""
    settings = FULL
    root.mkdir(parents=True, exist_ok=True)
    r = Runner(root, settings, device)
    raw = r.make_test_set(test_set)
    r.install_model(DEMO_MODEL_DIR / GFSCREEN_MODEL_FOLDER, settings.trainer)
    gfscreen = r.fold_folder(settings.trainer).parent
    setup = Setup(str(gfscreen.parent.parent), r.dataset_name, GFSCREEN_CONFIGURATION, settings.trainer,
                  str(raw / "imagesTs"), device, npp, nps)
    prepare_models(setup)
    return r, setup


def run_commands(setup: Setup, env: dict, work: Path, ttas: Sequence[bool] = (False, True),
                 keys: Sequence[str] = "abcd", time_left: Optional[Callable[[], float]] = None,
                 say: Callable[[str], None] = print) -> dict:
    """Every command (keys) with every TTA setting, in sequence (child processes with `env`, nnUNet_results set
    to setup.results), then the in-process phases of (a) and (b). `time_left` (seconds): a command whose
    estimate (its own TTA-off wall time, x8 for TTA on) does not fit is skipped and listed."""
    import torch
    from nnunetv2_gfscreen.predictors.cli import _device
    env = {**env, "nnUNet_results": setup.results}
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    case_files = sorted(str(p) for p in Path(setup.input_folder).glob("*_0000.nii.gz"))
    n_cases = len(case_files)
    rows, skipped = [], []
    for tta in ttas:
        for key in keys:
            earlier = [x["wall_seconds"] for x in rows if x["key"] == key]
            estimate = (8 if tta else 1) * min(earlier) if earlier else 0.0
            if time_left is not None and time_left() < estimate:
                skipped.append(f"({key}) TTA {'on' if tta else 'off'}: budget (about {estimate:.0f} s needed)")
                continue
            out = work / f"{key}_tta{int(tta)}"
            row = {"key": key, "command": COMMANDS[key], "tta": tta, "cases": n_cases,
                   **run_command(key, setup, out, tta, env, logs)}
            row["seconds_per_case"] = row["wall_seconds"] / n_cases
            probe = row["probe"]
            if key == "b":
                row["selection_ratio"] = probe["gate_tiles_selected"] / max(1, probe["gate_tiles_scored"])
            if key in "cd":
                row["phases"] = report_phases(out / "reports")
                row["selection_ratio"] = row["phases"]["selection_ratio"]
                row["pipeline_seconds"] = json.loads((out / "gfscreen_pipeline.json").read_text())["pipeline_seconds"]
            say(f"[{key}] TTA {'on ' if tta else 'off'} {row['wall_seconds']:7.2f} s  {COMMANDS[key]}")
            rows.append(row)
    # nnU-Net's own steps in-process: where (a)'s and (b)'s time goes (not part of the timed commands); this
    # process looks the trainers up where the commands did
    os.environ["nnUNet_extTrainer"] = env.get("nnUNet_extTrainer", os.environ.get("nnUNet_extTrainer", ""))
    try:
        device = _device(setup.device)  # the commands' thread settings
    except RuntimeError:  # CUDA: interop threads can only be set before torch's first parallel work
        device = torch.device(setup.device)
    models = {"a": setup.model_folder(PLAIN_TRAINER), "b": setup.model_folder(setup.gfscreen_trainer)}
    for row in rows:
        if row["key"] in models and (time_left is None or time_left() > row["wall_seconds"]):
            row["phases"] = stock_phases(models[row["key"]], [[f] for f in case_files], row["tta"], device,
                                         work / f"phases_{row['key']}_tta{int(row['tta'])}")
    for row in rows:
        ref = next((x for x in rows if x["key"] == "a" and x["tta"] == row["tta"]), None)
        row["speedup_vs_a"] = None if ref is None else ref["wall_seconds"] / row["wall_seconds"]
        row["label_voxels_differing_from_a"] = None if ref is None else \
            label_differences(work / f"a_tta{int(row['tta'])}", work / f"{row['key']}_tta{int(row['tta'])}")
    return {"rows": rows, "skipped": skipped, "cases": n_cases, "npp": setup.npp, "nps": setup.nps,
            "device": setup.device, "torch_threads": torch.get_num_threads(), "verdict": verdict(rows),
            "glance_share": glance_share(rows)}


def glance_share(rows: Sequence[dict]) -> Dict[str, Optional[float]]:
    """Glance seconds of (c) over the dense Focus seconds of (d), per TTA setting (issue: <= 10% for the CPU
    network of the demo)."""
    out = {}
    for tta in (False, True):
        c = next((x for x in rows if x["key"] == "c" and x["tta"] == tta), None)
        d = next((x for x in rows if x["key"] == "d" and x["tta"] == tta), None)
        if c is not None and d is not None:
            out[f"tta_{'on' if tta else 'off'}"] = c["phases"]["glance"] / d["phases"]["focus"]
    return out


def verdict(rows: Sequence[dict]) -> Dict[str, dict]:
    """The issue's targets: gated (c) >= 10x faster than (a) end to end, TTA on and off; peak memory of gated
    prediction ((b), (c)) not above dense (a)'s."""
    out = {}
    for tta in (False, True):
        by_key = {x["key"]: x for x in rows if x["tta"] == tta}
        tag = f"tta_{'on' if tta else 'off'}"
        if "a" in by_key and "c" in by_key:
            s = by_key["c"]["speedup_vs_a"]
            out[f"speedup_{tag}"] = {"value": s, "target": TARGET_SPEEDUP, "met": s >= TARGET_SPEEDUP}
        if "a" in by_key:
            for key in "bc":
                if key in by_key:
                    mem = {m: (by_key[key][m], by_key["a"][m]) for m in ("peak_rss_mib", "peak_gpu_memory_gib")
                           if by_key[key][m] is not None and by_key["a"][m] is not None}
                    out[f"peak_memory_{key}_{tag}"] = {"value": mem, "met": all(x <= y for x, y in mem.values())}
    return out


def _f(v, fmt="{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def cases_seconds(row: dict) -> Optional[float]:
    """Seconds the command spent on its cases: (c), (d) the pipeline's own clock; (a), (b) the cases times the
    in-process case total (an estimate)."""
    if "pipeline_seconds" in row:
        return row["pipeline_seconds"]
    return None if row.get("phases") is None else row["cases"] * row["phases"]["case_total"]


def table(result: dict) -> str:
    """Markdown: the commands, where their time goes, and the per-case phases."""
    rows = result["rows"]
    gpu = any(x["peak_gpu_memory_gib"] is not None for x in rows)
    tta = lambda x: "on" if x["tta"] else "off"  # noqa: E731
    head = ["command", "TTA", "wall s", "s/case", "x vs (a)", "tiles to Focus %", "peak RSS MiB",
            *(["peak GPU GiB"] if gpu else []), "labels != (a)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for x in rows:
        sel = 100.0 if x["key"] in "ad" else (None if x.get("selection_ratio") is None else 100 * x["selection_ratio"])
        cells = [f"({x['key']}) {x['command']}", tta(x), _f(x["wall_seconds"]), _f(x["seconds_per_case"]),
                 _f(x["speedup_vs_a"], "{:.1f}"), _f(sel, "{:.1f}"), _f(x["peak_rss_mib"], "{:.0f}"),
                 *([_f(x["peak_gpu_memory_gib"])] if gpu else []), _f(x["label_voxels_differing_from_a"], "{:d}")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Where each command's time goes (seconds):", "",
              "| command | TTA | start-up (interpreter, imports) | model loading | cases | rest of the run | exit |",
              "|---|---|---|---|---|---|---|"]
    for x in rows:
        cases = cases_seconds(x)
        rest = None if cases is None else x["run_seconds"] - (x["model_loading_seconds"] or 0.0) - cases
        lines.append(f"| ({x['key']}) | {tta(x)} | {_f(x['startup_seconds'])} | {_f(x['model_loading_seconds'])} | "
                     f"{_f(cases)} | {_f(rest)} | {_f(x['exit_seconds'])} |")
    lines += ["", "Per case (seconds, mean over the cases; (a), (b): nnU-Net's steps in-process after the commands, "
                  "(c), (d): the commands' reports):", "",
              "| command | TTA | read+preprocess | Glance | Focus | export | case total |", "|---|---|---|---|---|---|---|"]
    for x in rows:
        p = x.get("phases")
        if p is None:
            continue
        glance = _f(p["glance"]) if "glance" in p else "-"
        focus = _f(p["focus"]) if "focus" in p else \
            (_f(p["sliding_window"]) + (" (Glance + Focus)" if x["key"] == "b" else ""))
        lines.append(f"| ({x['key']}) | {tta(x)} | {_f(p['preprocess'])} | {glance} | {focus} | {_f(p['export'])} | "
                     f"{_f(p['case_total'])} |")
    return "\n".join(lines) + "\n"


def notes(result: dict) -> List[str]:
    out = [f"{result['cases']} cases: {result['test_set']}; model: {result['model']}.",
           f"Every command with -npp {result['npp']} -nps {result['nps']}, -device {result['device']}, "
           f"--disable_progress_bar; a fresh process each (benchmarks/command_probe.py runs the console script's "
           f"entry function and records peak RSS, model loading and, for (b), the gate's tile counts).",
           f"TTA on: both model copies were given inference_allowed_mirroring_axes = {TTA_AXES} (the shipped model was "
           f"trained without mirroring): the rows measure what TTA costs, not the accuracy of a mirrored model.",
           "Start-up: launch until the command's module is imported; model loading: initialize_from_trained_model_folder "
           "(trainer class lookup, checkpoint, network); cases: (c), (d) the pipeline's clock (read .. last mask "
           "and report written), (a), (b) cases x the in-process case total (an estimate); rest: the entry function's "
           "other work (arguments, listing the folder, writing its json files); exit: interpreter shutdown.",
           "Tiles to Focus: (b) the tiles above the threshold as the network counted them (mirrored copies reuse "
           "their tile's decision); (c) the reports' selection (threshold, floor, fallback, border growth), pooled."]
    share = result["glance_share"]
    if share:
        out.append("Glance share (Glance seconds of (c) / dense Focus seconds of (d)): " +
                   ", ".join(f"TTA {k[4:]} {100 * v:.1f}%" for k, v in share.items()) + " (target <= 10% for the "
                   "demo's CPU network).")
    for name, v in result["verdict"].items():
        met = "met" if v["met"] else "MISSED"
        if name.startswith("speedup"):
            out.append(f"Target (c) >= {v['target']:.0f}x faster than (a), {name[8:].replace('_', ' ')}: {met} "
                       f"(x{v['value']:.2f})")
        else:
            vals = ", ".join(f"{m} {a:.2f} vs {b:.2f}" for m, (a, b) in v["value"].items())
            out.append(f"Target peak memory of ({name[12]}) <= (a), {name[14:].replace('_', ' ')}: {met} ({vals})")
    out += [f"skipped: {s}" for s in result["skipped"]]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", type=str, default="bench_commands_output", help="work and output folder")
    parser.add_argument("-device", type=str, default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("-npp", type=int, default=0, help="-npp of every command (default 0)")
    parser.add_argument("-nps", type=int, default=0, help="-nps of every command (default 0)")
    parser.add_argument("--tta", type=int, nargs="+", default=[0, 1], help="0: --disable_tta, 1: mirroring TTA")
    parser.add_argument("--commands", type=str, default="abcd", help="which of a, b, c, d (default all)")
    parser.add_argument("--cases", type=int, default=DEMO_CASES.num_cases, help="test cases (default the demo's 8)")
    args = parser.parse_args()
    if not set(args.commands) <= set(COMMANDS) or args.cases < 1:
        parser.error(f"--commands takes letters of {''.join(COMMANDS)} and --cases >= 1")
    test_set = DEMO_CASES if args.cases == DEMO_CASES.num_cases else \
        replace(DEMO_CASES, key=f"demo{args.cases}", dataset_id=DEMO_CASES.dataset_id + 10, num_cases=args.cases)
    r, setup = prepare(Path(args.o), test_set, args.device, args.npp, args.nps)
    result = run_commands(setup, r.env, r.root / "commands", [bool(t) for t in args.tta], args.commands, say=r.say)
    result.update(test_set=f"{test_set.description}, {list(test_set.shape)} voxels, lesions raised by "
                           f"{FULL.lesion_boost_hu:g} HU", model=f"{DEMO_MODEL_DIR / GFSCREEN_MODEL_FOLDER} "
                           f"(its calibrated rule)", machine=machine_description(), setup=asdict(setup))
    text = table(result)
    result["table_markdown"] = text
    r.write_results("bench_commands", "Prediction commands end to end", "The prediction commands, end to end:\n\n",
                    result, text, asdict(setup), notes(result))


if __name__ == "__main__":
    main()
