"""Benchmark: end to end, stock nnUNetv2_predict against nnUNetv2_predict_gfscreen, same weights.

Not a test: prints a table and writes JSON. For every TTA setting (and --torch_io mode):
  one case   stock: nnU-Net's three steps timed in-process (DefaultPreprocessor.run_case,
             predict_logits_from_preprocessed_data, export_prediction_from_logits) and its
             predict_from_files on a one-case folder (what the command costs, worker start-up included);
             ours: timing.predict_case (nnUNetv2_predict_gfscreen's stages; phases from its report).
  folder     N cases: stock predict_from_files vs cli.predict_folder, both with -npp/-nps workers.
Peak GPU memory is torch.cuda.max_memory_allocated over each run (CUDA only). The stock network is the
GF-Screen model's Focus (a plain PlainConvUNet) with the same weights. With random weights the Glance
means nothing, so the gate threshold is the score quantile giving --selection (table says so).

  # GPU (nnU-Net's default 3d_fullres network, 512x512x120 CT at 0.7 x 0.7 x 2.0 mm):
  python benchmarks/bench_end_to_end.py --default_plans -device cuda --out e2e_gpu.json
  # CPU smoke version (small network and volume):
  python benchmarks/bench_end_to_end.py --small -device cpu --shape 32 128 128 --cases 4 --torch_io off on \
      -npp 2 -nps 2 --threads 1 --out e2e_cpu.json
"""
import argparse
import copy
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import List

import numpy as np
import SimpleITK as sitk
import torch

from timing import Peak, predict_case, stock_case_phases

from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_gfscreen.predictors.cli import _device, predict_folder
from nnunetv2_gfscreen.predictors.gfscreen_predictor import GFScreenPredictor
from nnunetv2_gfscreen.trainers import GFScreenTrainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the lab (not installed)
from bench_gated_inference import DATASET_JSON, DEFAULT_PLANS  # noqa: E402  (a script next to this one)
from gfscreen_lab.synthetic.dataset import generate_case  # noqa: E402

# a narrow 4-stage network with a 16x64x64 patch: the default plans' pipeline at CPU scale
SMALL_ARCH = {"n_stages": 4, "features_per_stage": [8, 16, 32, 32],
              "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
              "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
              "n_conv_per_stage": [2, 2, 2, 2], "n_conv_per_stage_decoder": [2, 2, 2]}


def _plans(small: bool) -> PlansManager:
    plans = copy.deepcopy(DEFAULT_PLANS)
    if small:
        cfg = plans["configurations"]["3d_fullres"]
        cfg["patch_size"] = [16, 64, 64]
        cfg["architecture"]["arch_kwargs"].update(SMALL_ARCH)
    return PlansManager(plans)


def _write_cases(folder: str, n: int, shape, spacing_zyx) -> List[str]:
    """n synthetic CTs (gfscreen_lab.synthetic.dataset anatomy, written at spacing_zyx) as <case>_0000.nii.gz."""
    os.makedirs(folder, exist_ok=True)
    files = []
    for i in range(n):
        image, _, _, _ = generate_case(seed=0, case_index=i, shape=shape)
        img = sitk.GetImageFromArray(image)
        img.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
        path = os.path.join(folder, f"case{i:03d}_0000.nii.gz")
        sitk.WriteImage(img, path, True)
        files.append(path)
    return files


def _stock(pm, cm, net, device, tta: bool) -> nnUNetPredictor:
    p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=tta,
                        perform_everything_on_device=device.type == "cuda", device=device, allow_tqdm=False)
    p.manual_initialization(net.focus, pm, cm, [copy.deepcopy(net.focus.state_dict())], DATASET_JSON,
                            "nnUNetTrainer", (0, 1, 2) if tta else None)
    return p


def _ours(pm, cm, net, device, tta: bool, threshold: float, torch_io: str, dense: bool = False,
          score_dense: bool = False) -> GFScreenPredictor:
    p = GFScreenPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=tta,
                          perform_everything_on_device=device.type == "cuda", device=device, allow_tqdm=False,
                          threshold=threshold, dense=dense, torch_io=torch_io, score_dense=score_dense)
    p.manual_initialization(net, pm, cm, [copy.deepcopy(net.state_dict())], DATASET_JSON, "GFScreenTrainer",
                            (0, 1, 2) if tta else None)
    return p


def _stock_folder(p: nnUNetPredictor, in_folder: str, out_folder: str, npp: int, nps: int) -> float:
    t0 = time.perf_counter()
    p.predict_from_files(in_folder, out_folder, save_probabilities=False, overwrite=True,
                         num_processes_preprocessing=max(1, npp), num_processes_segmentation_export=max(1, nps))
    return time.perf_counter() - t0


def _gate_threshold(pm, cm, net, device, case_file: str, selection: float, work: str) -> float:
    probe = _ours(pm, cm, net, device, False, None, "auto", dense=True, score_dense=True)  # --dense --score_tiles
    report = predict_case(probe, [case_file], os.path.join(work, "probe"), os.path.join(work, "probe_reports"))
    scores = np.array([t["score"] for t in report["tiles"]])
    return float(np.quantile(scores, 1 - selection))


def run(args) -> dict:
    device = _device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pm = _plans(args.small)
    cm = pm.get_configuration("3d_fullres")
    torch.manual_seed(0)
    net = GFScreenTrainer.build_network_architecture(pm, cm, 1, 2, enable_deep_supervision=False).to(device).eval()
    work = args.work or tempfile.mkdtemp(prefix="bench_e2e_")
    in_folder, one_folder = os.path.join(work, "in"), os.path.join(work, "one")
    files = _write_cases(in_folder, args.cases, args.shape, args.spacing)
    os.makedirs(one_folder, exist_ok=True)
    one_case = os.path.join(one_folder, os.path.basename(files[0]))
    shutil.copy(files[0], one_case)
    threshold = _gate_threshold(pm, cm, net, device, files[0], args.selection, work)

    results = {"network": "nnU-Net default 3d_fullres PlainConvUNet, 48x224x192 patch" if not args.small
               else "small 4-stage PlainConvUNet, 16x64x64 patch", "weights": "random (same for both)",
               "shape_zyx": list(args.shape), "spacing_zyx_mm": list(args.spacing), "cases": args.cases,
               "npp": args.npp, "nps": args.nps, "device": str(device), "torch_threads": torch.get_num_threads(),
               "threshold": threshold, "threshold_from": f"score quantile giving {args.selection:.0%} selection",
               "machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "cpu_count": os.cpu_count(), "torch": torch.__version__,
                           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
               "runs": []}
    for tta in args.tta:
        stock = _stock(pm, cm, net, device, tta)
        stock_case_phases(stock, [files[0]], os.path.join(work, "warm_stock"), device)  # warm-up (cudnn, caches)
        with Peak(device) as peak:
            phases = stock_case_phases(stock, [files[0]], os.path.join(work, "stock_one"), device)
        row = {"predictor": "stock nnUNetv2_predict", "tta": tta, "one_case": phases, "one_case_peak_gib": peak.gib}
        row["one_case_command_seconds"] = _stock_folder(stock, one_folder, os.path.join(work, "stock_one_cmd"),
                                                        1, 1)
        with Peak(device) as peak:
            wall = _stock_folder(stock, in_folder, os.path.join(work, "stock_folder"), args.npp, args.nps)
        row.update(folder_seconds=wall, folder_cases_per_minute=60 * args.cases / wall, folder_peak_gib=peak.gib)
        results["runs"].append(row)
        del stock
        for mode in args.torch_io:
            ours = _ours(pm, cm, net, device, tta, threshold, mode)
            rdir = os.path.join(work, "reports")
            predict_case(ours, [files[0]], os.path.join(work, "warm_ours"), rdir)  # warm-up
            with Peak(device) as peak:
                rep = predict_case(ours, [files[0]], os.path.join(work, "ours_one"), rdir)
            row = {"predictor": f"nnUNetv2_predict_gfscreen (torch_io {mode}: {ours.use_torch_io})", "tta": tta,
                   "one_case": {"preprocess": rep["preprocess_seconds"],
                                "sliding_window": rep["sliding_window_seconds"],
                                "export": rep["export_seconds"], "total": rep["total_seconds"]},
                   "one_case_peak_gib": peak.gib, "selection_ratio": rep["selection_ratio"]}
            out = os.path.join(work, f"ours_folder_{mode}")
            with Peak(device) as peak:
                t0 = time.perf_counter()
                predict_folder(ours, in_folder, out, num_processes_preprocessing=args.npp,
                               num_processes_segmentation_export=args.nps)
                wall = time.perf_counter() - t0
            row.update(folder_seconds=wall, folder_cases_per_minute=60 * args.cases / wall, folder_peak_gib=peak.gib)
            results["runs"].append(row)
    return results


def _table(results: dict) -> str:
    r0 = results
    lines = [f"{r0['network']}, {r0['weights']} | {r0['shape_zyx']} voxels at {r0['spacing_zyx_mm']} mm (z, y, x) | "
             f"device {r0['device']} ({r0['torch_threads']} torch threads) | folder: {r0['cases']} cases, -npp {r0['npp']} -nps {r0['nps']}",
             f"gate threshold {r0['threshold']:.4g} ({r0['threshold_from']})",
             f"{'predictor':48} {'TTA':>3} {'prep s':>7} {'sw s':>7} {'exp s':>7} {'case s':>7} {'cmd s':>7} "
             f"{'folder s':>8} {'cases/min':>9} {'peak GiB':>8}"]
    stock_case, stock_folder = {}, {}
    for r in results["runs"]:
        p = r["one_case"]
        peak = max([g for g in (r["one_case_peak_gib"], r["folder_peak_gib"]) if g is not None], default=None)
        cmd = r.get("one_case_command_seconds")
        lines.append(f"{r['predictor']:48} {'on' if r['tta'] else 'off':>3} {p['preprocess']:7.2f} "
                     f"{p['sliding_window']:7.2f} {p['export']:7.2f} {p['total']:7.2f} "
                     f"{(f'{cmd:7.2f}' if cmd is not None else '-'):>7} {r['folder_seconds']:8.2f} "
                     f"{r['folder_cases_per_minute']:9.2f} {(f'{peak:8.2f}' if peak is not None else '-'):>8}")
        if r["predictor"].startswith("stock"):
            stock_case[r["tta"]], stock_folder[r["tta"]] = p["total"], r["folder_seconds"]
        else:
            lines[-1] += (f"   x{stock_case[r['tta']] / p['total']:.2f} case, "
                          f"x{stock_folder[r['tta']] / r['folder_seconds']:.2f} folder")
    lines.append("prep = read + preprocess, sw = sliding window, exp = export + write, case = one case in-process; "
                 "cmd = stock predict_from_files on a one-case folder (worker start-up included); x = speed-up "
                 "over stock (in-process case, folder)")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--default_plans", action="store_true", help="nnU-Net's default 3d_fullres network (GPU)")
    size.add_argument("--small", action="store_true", help="a small network and patch (CPU)")
    parser.add_argument("-device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", type=int, nargs=3, default=[120, 512, 512], help="CT array shape (z y x)")
    parser.add_argument("--spacing", type=float, nargs=3, default=[2.0, 0.7, 0.7], help="CT spacing (z y x) mm")
    parser.add_argument("--cases", type=int, default=10, help="cases in the folder run")
    parser.add_argument("-npp", type=int, default=3)
    parser.add_argument("-nps", type=int, default=3)
    parser.add_argument("--selection", type=float, default=0.2, help="share of tiles the gate lets through")
    parser.add_argument("--tta", type=int, nargs="+", default=[0, 1], help="0: no mirroring, 1: mirroring TTA")
    parser.add_argument("--torch_io", type=str, nargs="+", default=["auto"], choices=["auto", "on", "off"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of this process (default as the CLI: all cores on CPU, 1 with CUDA); "
                             "on a shared, busy CPU 1 avoids OpenMP spinning")
    parser.add_argument("--work", type=str, default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--out", type=str, default="bench_end_to_end.json")
    args = parser.parse_args()
    args.tta = [bool(t) for t in args.tta]
    if not 0 < args.selection <= 1 or args.cases < 1:
        parser.error(f"--selection must be in (0, 1] and --cases >= 1, got {args.selection} and {args.cases}")
    results = run(args)
    results["table"] = _table(results)
    print(results["table"])
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
