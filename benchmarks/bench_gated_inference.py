"""Benchmark: dense stock nnUNetPredictor vs GFScreenPredictor on the same weights and volume, and the Glance's share.

Not a test: prints a table and writes JSON. Per TTA setting, the sliding window alone (no reading or export):
stock nnUNetPredictor dense, GFScreenPredictor --dense (no Glance) and gated. The Glance share is the gated run's
Glance seconds (each tile scored once) over the dense Focus seconds of GFScreenPredictor --dense (issue target:
<= 3% with nnU-Net's planned network, <= 10% with the demo's CPU network), and over the stock dense window.
Two sources of weights:
  --model_folder FOLDER [-f 0] [-chk checkpoint_final.pth]   a trained GF-Screen model (its calibrated threshold)
  --default_plans                                             random weights of nnU-Net's default 3d_fullres
                                                              PlainConvUNet for abdominal CT (48x224x192 patch)
With random weights the Glance's scores carry no meaning, so the threshold is set to the score
quantile that gives `--selection` (the share of tiles the Focus sees); the table says so.

  python benchmarks/bench_gated_inference.py --default_plans --shape 110 512 512 -device cuda --out gpu.json
  python benchmarks/bench_gated_inference.py --model_folder RESULTS/.../GFScreenTrainer__nnUNetPlans__3d_fullres -device cpu
"""
import argparse
import json
import os
import platform
import sys
import time
from typing import Optional

import numpy as np
import torch

from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_gfscreen.predictors.gfscreen_predictor import GFScreenPredictor
from nnunetv2_gfscreen.trainers import GFScreenTrainer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the lab (not installed)
from gfscreen_lab.experiments.results_files import machine_description  # noqa: E402
from gfscreen_lab.ext_trainer_env import ENV_VAR, lab_environment  # noqa: E402

# nnU-Net's default 3d_fullres plan for an abdominal CT at 2.5 x 0.78 x 0.78 mm (docs/nnunet_internals.md, section 10)
DEFAULT_PLANS = {
    "dataset_name": "Dataset000_Benchmark", "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
    "original_median_spacing_after_transp": [2.5, 0.78, 0.78], "original_median_shape_after_transp": [110, 512, 512],
    "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "label_manager": "LabelManager",
    "experiment_planner_used": "ExperimentPlanner",
    "foreground_intensity_properties_per_channel": {"0": {"max": 1000.0, "mean": 60.0, "median": 60.0, "min": -1000.0,
                                                          "percentile_00_5": -100.0, "percentile_99_5": 300.0,
                                                          "std": 60.0}},
    "configurations": {"3d_fullres": {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": [48, 224, 192], "median_image_size_in_voxels": [110, 512, 512], "spacing": [2.5, 0.78, 0.78],
        "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                         "arch_kwargs": {"n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320],
                                         "conv_op": "torch.nn.modules.conv.Conv3d",
                                         "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3],
                                                          [3, 3, 3]],
                                         "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
                                         "n_conv_per_stage": [2, 2, 2, 2, 2, 2],
                                         "n_conv_per_stage_decoder": [2, 2, 2, 2, 2], "conv_bias": True,
                                         "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                                         "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                                         "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                                         "nonlin_kwargs": {"inplace": True}},
                         "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        "batch_dice": False}},
}
DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "lesion": 1}, "numTraining": 1,
                "file_ending": ".nii.gz"}


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def _default_plans_network(device):
    pm = PlansManager(json.loads(json.dumps(DEFAULT_PLANS)))
    cm = pm.get_configuration("3d_fullres")
    torch.manual_seed(0)
    net = GFScreenTrainer.build_network_architecture(pm, cm, 1, 2, enable_deep_supervision=False)
    return pm, cm, net.to(device).eval()


def _predictors(pm, cm, net, device, use_mirroring, threshold, tile_batch_size):
    """(stock dense, ours --dense, ours gated) on the same network."""
    common = dict(tile_step_size=0.5, use_gaussian=True, use_mirroring=use_mirroring,
                  perform_everything_on_device=device.type == "cuda", device=device, allow_tqdm=False)
    stock = nnUNetPredictor(**common)
    dense = GFScreenPredictor(**common, dense=True, tile_batch_size=tile_batch_size)
    gated = GFScreenPredictor(**common, threshold=threshold, tile_batch_size=tile_batch_size)
    for p in (stock, dense, gated):
        p.manual_initialization(net, pm, cm, None, DATASET_JSON, "GFScreenTrainer",
                                (0, 1, 2) if use_mirroring else None)
    return stock, dense, gated


def run(args) -> dict:
    device = torch.device(args.device)
    if args.model_folder:
        os.environ[ENV_VAR] = lab_environment(os.environ)[ENV_VAR]  # a model of a lab trainer (the demo's) loads too
        loader = GFScreenPredictor(device=device, allow_tqdm=False)
        loader.initialize_from_trained_model_folder(args.model_folder, (args.f,), args.chk)
        pm, cm, net = loader.plans_manager, loader.configuration_manager, loader.network.eval()
        source = f"trained model {args.model_folder} fold {args.f}"
    else:
        pm, cm, net = _default_plans_network(device)
        source = "nnU-Net default 3d_fullres PlainConvUNet plans (48x224x192 patch), random weights"
    torch.manual_seed(1)
    volume = torch.randn((1, *args.shape), dtype=torch.float32)

    threshold: Optional[float] = None
    threshold_note = "the model's calibrated threshold"
    probe = GFScreenPredictor(device=device, allow_tqdm=False, use_mirroring=False, dense=True, score_dense=True,
                              perform_everything_on_device=device.type == "cuda")
    probe.manual_initialization(net, pm, cm, None, DATASET_JSON, "GFScreenTrainer", None)
    with torch.no_grad():
        probe.predict_sliding_window_return_logits(volume)
    scores = np.array(probe.records[-1].scores)
    if args.selection is not None or not args.model_folder:
        target = args.selection if args.selection is not None else 0.2
        threshold = float(np.quantile(scores, 1 - target))
        threshold_note = f"score quantile giving {target:.0%} selection"

    results = {"source": source, "shape": list(args.shape), "device": str(device), "tiles": len(scores),
               "threshold": threshold if threshold is not None else float(net.gate.threshold),
               "threshold_from": threshold_note,
               "machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "cpu_count": os.cpu_count(), "torch": torch.__version__,
                           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                           "description": machine_description()},
               "runs": {}}
    for tta in args.tta:
        stock, dense, gated = _predictors(pm, cm, net, device, tta, threshold, args.tile_batch_size)
        with net.ungated():
            t_stock, _ = _timed(lambda: stock.predict_sliding_window_return_logits(volume), device, args.repeats)
        t_dense, _ = _timed(lambda: dense.predict_sliding_window_return_logits(volume), device, args.repeats)
        t_gated, _ = _timed(lambda: gated.predict_sliding_window_return_logits(volume), device, args.repeats)
        rec, dense_rec = gated.records[-1], dense.records[-1]
        results["runs"]["tta" if tta else "no_tta"] = {
            "dense_seconds": t_stock, "ours_dense_seconds": t_dense, "gated_seconds": t_gated,
            "speedup": t_stock / t_gated, "selection_ratio": rec.tiles_selected / len(rec.selected),
            "glance_seconds": rec.glance_seconds, "focus_seconds": rec.focus_seconds,
            "dense_focus_seconds": dense_rec.focus_seconds, "dense_glance_seconds": dense_rec.glance_seconds,
            "glance_share_of_dense_focus": rec.glance_seconds / dense_rec.focus_seconds,
            "glance_share_of_dense": rec.glance_seconds / t_stock,
        }
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model_folder", type=str)
    src.add_argument("--default_plans", action="store_true")
    parser.add_argument("-f", type=int, default=0)
    parser.add_argument("-chk", type=str, default="checkpoint_final.pth")
    parser.add_argument("-device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", type=int, nargs=3, default=[110, 512, 512], help="preprocessed volume (z y x)")
    parser.add_argument("--selection", type=float, default=None,
                        help="force this selection ratio via the score quantile (default with random weights: 0.2)")
    parser.add_argument("--tta", type=int, nargs="+", default=[0, 1], help="0: no mirroring, 1: mirroring TTA")
    parser.add_argument("--tile_batch_size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=str, default="bench_gated_inference.json")
    args = parser.parse_args()
    args.tta = [bool(t) for t in args.tta]
    results = run(args)
    print(f"{results['source']} | volume {results['shape']} | {results['tiles']} tiles | device {results['device']}")
    print(f"threshold {results['threshold']:.4g} ({results['threshold_from']})")
    print(f"{'mode':8} {'stock s':>9} {'dense s':>9} {'focus s':>9} {'gated s':>9} {'speedup':>8} {'selected':>9} "
          f"{'glance s':>9} {'glance/focus':>12} {'glance/stock':>12}")
    for mode, r in results["runs"].items():
        print(f"{mode:8} {r['dense_seconds']:9.3f} {r['ours_dense_seconds']:9.3f} {r['dense_focus_seconds']:9.3f} "
              f"{r['gated_seconds']:9.3f} {r['speedup']:8.2f} {r['selection_ratio']:9.1%} {r['glance_seconds']:9.3f} "
              f"{r['glance_share_of_dense_focus']:12.1%} {r['glance_share_of_dense']:12.1%}")
    print("stock s: nnUNetPredictor dense; dense s / focus s: GFScreenPredictor --dense (no Glance), its Focus seconds; "
          "speedup: stock / gated; glance/focus: the gated run's Glance seconds over the dense Focus seconds")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
