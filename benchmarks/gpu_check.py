"""The GPU check: one run that measures what docs/benchmarks.md promises for a GPU, on a CT-sized synthetic dataset.

Run it through benchmarks/gpu_check.sh (which installs carried wheels and a SimpleITK stand-in if needed;
docs/benchmarks.md says how to run it on a GPU machine without nnU-Net). Stages, each timed, within --budget_s seconds:
  1. data     synthetic CTs (gfscreen_lab.synthetic anatomy), about 110x512x512 after resampling, written
              as NIfTI through nibabel (dataset.json selects nnU-Net's NibabelIO: no SimpleITK needed)
  2. plan     nnUNetv2_plan_and_preprocess with nnU-Net's default planner (3d_fullres)
  3. train    nnUNetv2_train with nnUNetTrainer and GFScreenTrainer (short-schedule variants from
              benchmarks/gpu_check_trainers/), same plans, torch.compile as nnU-Net decides (on for CUDA):
              seconds per training iteration after warm-up, peak GPU memory, and for GF-Screen the
              torch.compile graphs compiled during its final validation (recompilations after the first case)
  4. infer    the four predictors on one CT (TTA on/off, phases) in-process, the four whole commands on a few
              test cases (bench_commands.py's table: each a fresh process, TTA off and on), then the four
              predictors on the test folder in-process (gpu_check_inference.py)
Writes <out>/gpu_check.json and prints a table. --smoke: the same code on the CPU with tiny data and a narrow
network (a test runs it).
"""
import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

DATASET_ID, DATASET_NAME = 991, "GFScreenGPUCheck"
PROFILES = {
    "gpu": dict(shape=(110, 512, 512), n_train=6, n_test=10, epochs=2, iterations=20, val_iterations=5,
                device="cuda", budget_s=510, npp=3, nps=3, selection=0.17, command_cases=3),
    "smoke": dict(shape=(24, 64, 64), n_train=6, n_test=2, epochs=2, iterations=2, val_iterations=1,
                  device="cpu", budget_s=600, npp=1, nps=1, selection=0.17, command_cases=2),
}
SMOKE_PATCH = [16, 32, 32]
ITERATIONS_PER_EPOCH, VAL_ITERATIONS_PER_EPOCH = 250, 50  # nnU-Net's epoch, for the extrapolated epoch time
TARGETS = {"epoch_time_ratio_max": 1.5, "one_case_tta_speedup_min": 4.0, "folder_speedup_min": 4.0,
           "command_tta_speedup_min": 4.0, "recompilations_after_warmup_max": 0}


def _write_case(task) -> str:
    """Generate case i and write image (and label) as NIfTI with nibabel; returns the case id."""
    import nibabel
    import numpy as np
    from gfscreen_lab.synthetic.dataset import case_identifier, generate_case
    folder, split, i, shape = task
    image, label, spacing, _ = generate_case(seed=0, case_index=i, shape=shape)
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])  # NibabelIO: array (z, y, x) <-> file (x, y, z)
    cid = case_identifier(i)
    for arr, sub, name in ((image, f"images{split}", f"{cid}_0000.nii.gz"), (label, f"labels{split}", f"{cid}.nii.gz")):
        path = os.path.join(folder, sub, name)
        nibabel.save(nibabel.Nifti1Image(arr.transpose(2, 1, 0), affine), path + ".part.nii.gz")
        os.replace(path + ".part.nii.gz", path)
    return cid


def make_dataset(raw: str, shape, n_train: int, n_test: int, workers: int) -> str:
    folder = os.path.join(raw, f"Dataset{DATASET_ID}_{DATASET_NAME}")
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    tasks = [(folder, "Tr", i, tuple(shape)) for i in range(n_train)] + \
            [(folder, "Ts", n_train + i, tuple(shape)) for i in range(n_test)]
    # spawn: the GPU run has touched CUDA (is_available) in this process, and a forked child must not inherit that
    with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
        pool.map(_write_case, tasks)
    dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "lesion": 1},
                    "numTraining": n_train, "file_ending": ".nii.gz", "overwrite_image_reader_writer": "NibabelIO",
                    "name": DATASET_NAME}
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(dataset_json, f, indent=2)
    return folder


def run_cli(name: str, module: str, func: str, args, env: dict, log_dir: str, timeout: float) -> float:
    """An nnU-Net / GF-Screen console script, run as its entry point in a fresh interpreter; returns seconds."""
    code = f"import sys; sys.argv[0] = {name!r}; from {module} import {func} as f; sys.exit(f())"
    t0 = time.perf_counter()
    with open(os.path.join(log_dir, f"{name}_{len(os.listdir(log_dir))}.log"), "w") as log:
        proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, stdout=log,
                              stderr=subprocess.STDOUT, timeout=max(1.0, timeout))
    if proc.returncode != 0:
        raise RuntimeError(f"{name} {' '.join(map(str, args))} failed ({proc.returncode}); see {log.name}")
    return time.perf_counter() - t0


def shrink_plans_for_smoke(preprocessed: str) -> None:
    from gfscreen_lab.experiments.cpu_plans import CPU_ARCH_KWARGS, shrink_configuration_for_cpu
    path = os.path.join(preprocessed, f"Dataset{DATASET_ID}_{DATASET_NAME}", "nnUNetPlans.json")
    with open(path) as f:
        plans = shrink_configuration_for_cpu(json.load(f), "3d_fullres", SMOKE_PATCH, CPU_ARCH_KWARGS, batch_size=2)
    plans["configurations"]["3d_fullres"]["gfscreen"] = {"group_size": 4}
    with open(path, "w") as f:
        json.dump(plans, f, indent=2)


def _training_summary(metrics: dict) -> dict:
    last = metrics["epochs"][-1]  # after warm-up (compilation happens in epoch 0)
    per_it = last["train_seconds"] / metrics["iterations_per_epoch"]
    per_val = last["val_seconds"] / max(1, metrics["val_iterations_per_epoch"])
    return {"seconds_per_iteration": per_it, "seconds_per_val_iteration": per_val,
            "epoch_seconds_extrapolated": per_it * ITERATIONS_PER_EPOCH + per_val * VAL_ITERATIONS_PER_EPOCH,
            **metrics}


def run(args, p: dict, result: dict) -> dict:
    """The four stages; fills `result` as it goes, so a failure still leaves what was measured before it."""
    out = os.path.abspath(args.out)
    t_start = time.perf_counter()
    time_left = lambda: p["budget_s"] - (time.perf_counter() - t_start)
    folders = {k: os.path.join(out, k) for k in ("raw", "preprocessed", "results", "logs", "work")}
    for d in folders.values():
        os.makedirs(d, exist_ok=True)
    os.environ.update(nnUNet_raw=folders["raw"], nnUNet_preprocessed=folders["preprocessed"],
                      nnUNet_results=folders["results"])
    from nnunetv2_gfscreen.ext_trainer_env import SHIM_FOLDER
    os.environ["nnUNet_extTrainer"] = os.pathsep.join([os.path.join(HERE, "gpu_check_trainers"), SHIM_FOLDER])
    os.environ.update(GFSCREEN_CHECK_EPOCHS=str(p["epochs"]), GFSCREEN_CHECK_ITERATIONS=str(p["iterations"]),
                      GFSCREEN_CHECK_VAL_ITERATIONS=str(p["val_iterations"]))
    os.environ["PYTHONPATH"] = os.pathsep.join([HERE, ROOT] + [x for x in [os.environ.get("PYTHONPATH")] if x])
    env, workers = dict(os.environ), max(1, min(12, os.cpu_count() or 1))
    # smoke: augmentation in-process, no worker pool on a small CPU (the planner cannot take 0, training can)
    train_env = {**env, "nnUNet_n_proc_DA": "0", "GFSCREEN_CHECK_MIRRORING": "0"} if args.profile == "smoke" else env
    result.update(profile=args.profile, settings=p, stages={}, targets=TARGETS)

    t = time.perf_counter()
    raw_folder = make_dataset(folders["raw"], p["shape"], p["n_train"], p["n_test"], workers)
    result["stages"]["data_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    run_cli("nnUNetv2_plan_and_preprocess", "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints",
            "plan_and_preprocess_entry", ["-d", DATASET_ID, "-c", "3d_fullres", "-np", workers, "-npfp", workers],
            env, folders["logs"], time_left())
    if args.profile == "smoke":
        shrink_plans_for_smoke(folders["preprocessed"])
    result["stages"]["plan_seconds"] = time.perf_counter() - t
    with open(os.path.join(folders["preprocessed"], f"Dataset{DATASET_ID}_{DATASET_NAME}", "nnUNetPlans.json")) as f:
        cfg = json.load(f)["configurations"]["3d_fullres"]
    result["plans"] = {"patch_size": cfg["patch_size"], "batch_size": cfg["batch_size"], "spacing": cfg["spacing"],
                       "median_image_size": cfg.get("median_image_size_in_voxels")}

    training, model_folders = {}, {}
    for trainer in ("nnUNetTrainer_GPUCheck", "GFScreenTrainer_GPUCheck"):
        t = time.perf_counter()
        run_cli("nnUNetv2_train", "nnunetv2.run.run_training", "run_training_entry",
                [DATASET_ID, "3d_fullres", 0, "-tr", trainer, "-device", p["device"]], train_env, folders["logs"],
                time_left())
        model_folders[trainer] = os.path.join(folders["results"], f"Dataset{DATASET_ID}_{DATASET_NAME}",
                                              f"{trainer}__nnUNetPlans__3d_fullres")
        with open(os.path.join(model_folders[trainer], "fold_0", "gpu_check_metrics.json")) as f:
            training[trainer] = {"command_seconds": time.perf_counter() - t, **_training_summary(json.load(f))}
    result["training"] = training
    result["stages"]["train_seconds"] = sum(v["command_seconds"] for v in training.values())

    import torch
    from gpu_check_inference import load_predictors, run_commands_stage, run_folder, run_one_case, speedups
    from nnunetv2_gfscreen.predictors.cli import _device
    try:
        device = _device(p["device"])  # the CLIs' thread settings (1 torch thread with CUDA)
    except RuntimeError:  # interop threads can only be set before torch's first parallel work
        device = torch.device(p["device"])
    t = time.perf_counter()
    test_folder = os.path.join(raw_folder, "imagesTs")
    one = [os.path.join(test_folder, sorted(os.listdir(test_folder))[0])]
    preds = load_predictors(model_folders["nnUNetTrainer_GPUCheck"], model_folders["GFScreenTrainer_GPUCheck"],
                            device, p["selection"], one, folders["work"])
    inference = run_one_case(preds, one, folders["work"], device, time_left)
    inference.update(threshold=preds["threshold"], tiles_per_case=preds["probe_tiles"])
    result["inference"] = inference
    result["stages"]["inference_seconds"] = time.perf_counter() - t
    t = time.perf_counter()  # the whole commands before the folder runs, which the budget skips first
    result["commands"] = run_commands_stage(model_folders["GFScreenTrainer_GPUCheck"], preds["threshold"], test_folder,
                                            p["command_cases"], folders["work"], p["device"], p["npp"], p["nps"],
                                            time_left)
    result["stages"]["commands_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    run_folder(preds, inference, test_folder, folders["work"], device, p["npp"], p["nps"], time_left)
    inference["speedups"] = speedups(inference)
    result["stages"]["inference_seconds"] += time.perf_counter() - t
    result["stages"]["total_seconds"] = time.perf_counter() - t_start
    result["machine"] = {"platform": platform.platform(), "python": platform.python_version(),
                         "cpu_count": os.cpu_count(), "torch": torch.__version__,
                         "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    result["verdict"] = verdict(result)
    return result


def verdict(r: dict) -> dict:
    tr = r["training"]
    ratio = tr["GFScreenTrainer_GPUCheck"]["seconds_per_iteration"] / tr["nnUNetTrainer_GPUCheck"]["seconds_per_iteration"]
    s = r["inference"]["speedups"]
    recompiles = tr["GFScreenTrainer_GPUCheck"].get("final_validation", {}).get("recompilations_after_first_case")
    one, fold = s.get("one_case_tta_on_ours_gated"), s.get("folder_ours_gated")
    command = next((row["speedup_vs_a"] for row in r["commands"]["rows"] if row["key"] == "c" and row["tta"]), None)
    return {"epoch_time_ratio": ratio, "epoch_time_ok": ratio <= TARGETS["epoch_time_ratio_max"],
            "one_case_tta_speedup": one, "one_case_ok": one is not None and one >= TARGETS["one_case_tta_speedup_min"],
            "folder_speedup": fold, "folder_ok": fold is not None and fold >= TARGETS["folder_speedup_min"],
            "command_tta_speedup": command,
            "command_ok": command is not None and command >= TARGETS["command_tta_speedup_min"],
            "recompilations_after_warmup": recompiles,
            "recompilation_ok": recompiles is not None and recompiles <= TARGETS["recompilations_after_warmup_max"]}


def table(r: dict) -> str:
    f = lambda v, fmt="{:.2f}": "-" if v is None else fmt.format(v)
    lines = [f"GPU check ({r['profile']}) on {r['machine']['gpu'] or 'CPU'}, torch {r['machine']['torch']}, "
             f"{r['machine']['cpu_count']} CPUs | plans: patch {r['plans']['patch_size']}, batch {r['plans']['batch_size']}"
             f" | stages (s): " + ", ".join(f"{k[:-8]} {v:.0f}" for k, v in r["stages"].items()),
             f"{'trainer':28} {'s/it':>7} {'epoch s*':>8} {'peak GiB':>8} {'compile':>7}"]
    for name, t in r["training"].items():
        lines.append(f"{name:28} {t['seconds_per_iteration']:7.3f} {t['epoch_seconds_extrapolated']:8.1f} "
                     f"{f(t.get('peak_gpu_memory_gib')):>8} {str(t.get('compile')):>7}")
    fv = r["training"]["GFScreenTrainer_GPUCheck"].get("final_validation", {})
    lines.append(f"final validation: {f(fv.get('seconds'), '{:.0f}')} s, graphs compiled per case "
                 f"{fv.get('compiled_graphs_per_case')}; *epoch = {ITERATIONS_PER_EPOCH} + {VAL_ITERATIONS_PER_EPOCH} "
                 f"val iterations extrapolated from the last epoch")
    inf = r["inference"]
    lines.append(f"one CT ({inf['tiles_per_case']} tiles, gate threshold {inf['threshold']:.4g}):")
    lines.append(f"{'predictor':12} {'TTA':>3} {'prep s':>7} {'sw s':>7} {'exp s':>7} {'total s':>7} {'sel':>5} {'peak GiB':>8}")
    for row in inf["one_case"]:
        lines.append(f"{row['predictor']:12} {'on' if row['tta'] else 'off':>3} {row['preprocess']:7.2f} "
                     f"{row['sliding_window']:7.2f} {row['export']:7.2f} {row['total']:7.2f} "
                     f"{f(row['selection_ratio']):>5} {f(row['peak_gpu_memory_gib']):>8}")
    for row in inf["folder"]:
        lines.append(f"folder {row['predictor']:12} TTA {'on' if row['tta'] else 'off'}: {row['cases']} cases in "
                     f"{row['seconds']:.1f} s ({row['cases_per_minute']:.1f}/min)")
    lines += [f"skipped: {s}" for s in inf["skipped"]]
    c = r["commands"]
    lines += [f"whole commands (benchmarks/bench_commands.py) on {c['cases']} test case(s), -npp {c['npp']} "
              f"-nps {c['nps']}, the gate threshold as above alone, (c) and (d) with --no_border_growth, TTA axes "
              f"(0, 1, 2) in the model copies:", c["table"]]
    lines += [f"skipped: {s}" for s in c["skipped"]]
    v = r["verdict"]
    lines.append(f"targets: epoch ratio {f(v['epoch_time_ratio'])} (<= 1.5: {v['epoch_time_ok']}), one CT TTA "
                 f"x{f(v['one_case_tta_speedup'])} (>= 4: {v['one_case_ok']}), folder x{f(v['folder_speedup'])} "
                 f"(>= 4: {v['folder_ok']}), command TTA x{f(v['command_tta_speedup'])} (>= 4: {v['command_ok']}), "
                 f"recompilations after warm-up {v['recompilations_after_warmup']} (0: {v['recompilation_ok']})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny data on the CPU (under 3 minutes)")
    parser.add_argument("--out", default=None, help="output folder (default gpu_check_output[_smoke])")
    parser.add_argument("--budget_s", type=float, default=None,
                        help="seconds the check may take; inference runs that would not fit are skipped (default 510; "
                             "smoke 600, a guard only)")
    args = parser.parse_args()
    args.profile = "smoke" if args.smoke else "gpu"
    p = dict(PROFILES[args.profile])
    if args.budget_s is not None:
        p["budget_s"] = args.budget_s
    args.out = args.out or ("gpu_check_output_smoke" if args.smoke else "gpu_check_output")
    if os.path.exists(os.path.join(args.out, "raw")):
        parser.error(f"{args.out} already holds a check; remove it or pass another --out")
    if not args.smoke:
        import torch
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run with --smoke on a CPU")
    result, failed = {}, None
    try:
        run(args, p, result)
        result["table"] = table(result)
        print(result["table"])
    except BaseException as e:  # still write what was measured, then fail
        import traceback
        failed, result["error"] = e, traceback.format_exc()
    path = os.path.join(args.out, "gpu_check.json")
    os.makedirs(args.out, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")
    if failed is not None:
        raise failed


if __name__ == "__main__":
    main()
