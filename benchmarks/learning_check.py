"""Learning check: does the whole GF-Screen loop learn when the lesions are easy to see?

Not a test and not a tuning run. The CPU demo trains too briefly for the Focus to find the synthetic
lesions, so its rewards are all 0 and the GRL terms never see an advantage. This script removes that
one obstacle and asks whether the mechanics then work: synthetic cases whose lesion voxels are made
conspicuous (`--lesion_boost_hu` added inside the label of the raw images), a geometry with tens
of tiles per case, a longer CPU training (`GFScreenTrainer_DemoLong`), then dense and gated prediction
of held-out cases with the usual evaluation, plus the Glance's tile AUC from the predictor's reports.
What "works" looks like: the Focus finds lesions (rewards > 0), the Glance ranks lesion tiles above
the others (AUC well above 0.5), and the calibrated gate skips tiles without losing lesions.

  python benchmarks/learning_check.py -o learning_check_output          # about 40 minutes on 2 CPU cores

Prints a table and writes <o>/learning_check.json.
"""
import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.stats import rankdata

from nnunetv2_gfscreen.demo import DemoSettings, Runner, machine_description
from nnunetv2_gfscreen.evaluation.reports import load_report

SETTINGS = DemoSettings(dataset_id=904, num_train=16, num_test=6, shape=(32, 160, 160), patch_size=(16, 64, 64),
                        trainer="GFScreenTrainer_DemoLong")


def boost_lesions(raw_dataset: Path, boost_hu: float) -> int:
    """Add boost_hu inside the label of every raw image (imagesTr and imagesTs); returns the number changed.

    A marker file makes this idempotent, so a rerun on the same folder does not boost twice.
    """
    marker = raw_dataset / f"lesions_boosted_{boost_hu:g}HU"
    if marker.is_file():
        return 0
    changed = 0
    for images, labels in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        for img_path in sorted((raw_dataset / images).glob("*_0000.nii.gz")):
            lab_path = raw_dataset / labels / img_path.name.replace("_0000.nii.gz", ".nii.gz")
            img = sitk.ReadImage(str(img_path))
            arr = sitk.GetArrayFromImage(img).astype(np.float32)
            lab = sitk.GetArrayFromImage(sitk.ReadImage(str(lab_path)))
            if not lab.any():
                continue
            arr[lab > 0] += boost_hu
            out = sitk.GetImageFromArray(np.clip(arr, -1024, 3071).astype(np.int16))
            out.CopyInformation(img)
            sitk.WriteImage(out, str(img_path))
            changed += 1
    marker.write_text("lesion voxels of these images were raised by this many HU\n")
    return changed


def tile_auc(report_dir: Path, labels_dir: Path) -> dict:
    """AUC of the Glance's tile scores for 'tile holds lesion', pooled over the cases' reports."""
    scores, positive = [], []
    for rep_path in sorted(report_dir.glob("*.json")):
        report = load_report(str(rep_path))
        if "tiles" not in report:
            continue
        gt = sitk.GetArrayFromImage(sitk.ReadImage(str(labels_dir / (rep_path.stem + ".nii.gz")))) > 0
        for t in report["tiles"]:
            box = tuple(slice(lo, hi) for lo, hi in t["bbox_original"])
            scores.append(float(t["score"]))
            positive.append(bool(gt[box].any()))
    scores, positive = np.asarray(scores), np.asarray(positive)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return {"auc": None, "lesion_tiles": n_pos, "other_tiles": n_neg}
    ranks = rankdata(scores)   # Mann-Whitney U, average ranks for ties
    auc = (ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return {"auc": float(auc), "lesion_tiles": n_pos, "other_tiles": n_neg}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", type=str, default="learning_check_output", help="output folder")
    parser.add_argument("--lesion_boost_hu", type=float, default=300.0,
                        help="HU added inside the lesion label of the raw images. Default: 300")
    parser.add_argument("-device", type=str, default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    t0 = time.perf_counter()
    root = Path(args.o)
    root.mkdir(parents=True, exist_ok=True)
    r = Runner(root, SETTINGS, args.device)
    r.make_dataset()
    r.say(f"[boost] raised the lesion voxels of {boost_lesions(r.raw, args.lesion_boost_hu)} images by "
          f"{args.lesion_boost_hu:g} HU")
    r.plan_and_preprocess()
    r.train(SETTINGS.trainer)
    runs = {}
    for name, dense in (("dense", True), ("gated", False)):
        pred = r.root / "predictions" / name
        reports = r.predict(SETTINGS.trainer, pred, dense)
        runs[name] = {**r.evaluate(pred, reports)["aggregate"], **({} if dense else tile_auc(reports, r.raw / "labelsTs"))}
    log = sorted(r.fold_folder(SETTINGS.trainer).glob("training_log_*.txt"))[-1].read_text()
    rewards = [float(ln.split("mean reward ")[1].split(",")[0]) for ln in log.splitlines() if "mean reward " in ln]
    result = {"settings": asdict(SETTINGS), "lesion_boost_hu": args.lesion_boost_hu, "device": args.device,
              "machine": machine_description(), "minutes": (time.perf_counter() - t0) / 60,
              "mean_reward_per_epoch": rewards, "runs": runs}
    (root / "learning_check.json").write_text(json.dumps(result, indent=2))
    keys = ("dsc_mean", "nsd_mean", "lesion_sensitivity", "fp_per_case", "healthy_fp_rate", "selection_ratio_mean",
            "tile_sensitivity", "tile_specificity", "auc", "total_seconds_mean")
    print("\n| run | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for name, agg in runs.items():
        cells = [("n/a" if agg.get(k) is None else f"{agg[k]:.3f}") for k in keys]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\nmean reward per epoch: {[round(x, 3) for x in rewards]}")
    print(f"written to {root / 'learning_check.json'} ({result['minutes']:.1f} minutes)")


if __name__ == "__main__":
    main()
