"""Benchmark: CPU cost of one training step's augmentation, nnU-Net's batch vs a GF-Screen step.

Not a test: prints a table and writes JSON. nnU-Net trains on `batch_size` (2) augmented patches per
step; a GF-Screen step also draws a group of `group_size` (16) sub-volumes of one CT. The transforms
are nnU-Net's own, built as the trainer builds them for the patch size (rotation ranges, dummy-2D
rule, deep supervision), and run on random data of the loader's initial patch size, single-threaded
as in nnU-Net's workers. "Group" is what GFScreenTrainer gives the group's sub-volumes (centre crop,
mirroring, label clean-up); "all full" is nnU-Net's augmentation on every group sub-volume, which
our first version did.

  python benchmarks/bench_group_augmentation.py                      # 48x224x192, group 16, batch 2
  python benchmarks/bench_group_augmentation.py --patch 16 64 64 --group 8
"""
import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_gfscreen.trainers.GFScreenTrainer import GFScreenTrainer
from nnunetv2_gfscreen.trainers.group_sampling import centre_crop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the lab (not installed)
from gfscreen_lab.experiments.results_files import machine_description  # noqa: E402


def nnunet_like_transforms(patch_size, num_pools: int = 5):
    """Initial patch size, training and group transforms as nnU-Net's trainer configures them for a 3D patch
    (CT, one channel): its own configure_rotation_dummyDA_mirroring_and_inital_patch_size on a stand-in trainer."""
    stand_in = SimpleNamespace(configuration_manager=SimpleNamespace(patch_size=list(patch_size)),
                               print_to_log_file=lambda *args, **kwargs: None)
    rotation, dummy_2d, initial, mirror_axes = \
        nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size(stand_in)
    ds_scales = [[1.0, 1.0, 1.0]] + [[0.5 ** k] * 3 for k in range(1, num_pools)]
    tr = nnUNetTrainer.get_training_transforms(patch_size, rotation, ds_scales, mirror_axes, dummy_2d,
                                               use_mask_for_norm=[False], is_cascaded=False, foreground_labels=[1],
                                               regions=None, ignore_label=None)
    return tuple(int(i) for i in initial), tr, GFScreenTrainer.get_group_transforms(mirror_axes)


def seconds_per_patch(fn, repeats: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patch", type=int, nargs=3, default=[48, 224, 192], metavar=("Z", "Y", "X"))
    parser.add_argument("--group", type=int, default=16, help="GF-Screen group size. Default: 16")
    parser.add_argument("--batch", type=int, default=2, help="nnU-Net batch size (the Focus's). Default: 2")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=str, default=None, help="JSON output file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    patch = tuple(args.patch)
    initial, full, group = nnunet_like_transforms(patch)
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.standard_normal((1, *initial)).astype(np.float32))
    seg = torch.from_numpy((rng.random((1, *initial)) > 0.999).astype(np.int16))
    t_full = seconds_per_patch(lambda: full(image=image.clone(), segmentation=seg.clone()), args.repeats)
    t_group = seconds_per_patch(lambda: group(image=centre_crop(image, patch).clone(),
                                              segmentation=centre_crop(seg, patch).clone()), args.repeats)
    rows = {
        f"nnU-Net batch ({args.batch} full)": args.batch * t_full,
        f"group of {args.group}, all full (first version)": args.group * t_full,
        f"GFScreenTrainer: batch of {args.batch} full + group of {args.group}": args.batch * t_full
        + args.group * t_group,
    }
    print(f"patch {list(patch)} (initial {list(initial)}): full transforms {t_full:.3f} s, group {t_group:.4f} s "
          f"per patch, 1 thread\n\n| step | CPU s per step | x nnU-Net |\n|---|---|---|")
    base = rows[f"nnU-Net batch ({args.batch} full)"]
    for k, v in rows.items():
        print(f"| {k} | {v:.2f} | {v / base:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"patch": list(patch), "initial_patch": list(initial), "full_s_per_patch": t_full,
                       "group_s_per_patch": t_group, "cpu_s_per_step": rows,
                       "machine": machine_description()}, f, indent=2)


if __name__ == "__main__":
    main()
