"""Synthetic pan-cancer CT cases and nnU-Net raw datasets of them, for tests and demos without public CT.

Longer than 300 lines because a case, its scanner profiles and the dataset writer share the per-case random
streams that make every case reproducible on its own.

A case is a CT-like volume in HU (int16, (z, y, x)) of a randomised abdomen phantom
(synthetic_anatomy) with lesions of several kinds (synthetic_lesions) and a binary label (0
background, 1 lesion, as FLARE). Everything about case i comes from random streams seeded by
(seed, i), so a case never depends on how many cases are generated, and the same seed gives
byte-identical arrays. Anatomy, lesions and noise use separate streams: the healthy twin of a lesion
case (healthy=True) has the same anatomy and noise.

A `ScannerProfile` says how a site's scanner and population look (spacing, reconstruction blur, noise, HU
calibration offset and contrast, body habitus and framing). Cases come from the reference profile unless a
`shift` names another (`SHIFTS`): the test set of a model meeting another site's CT. A shift changes how the
case is imaged and whose body it is, never what a lesion is: the lesion kinds, their placement rules and the
binary label are the same.
"""
import argparse
import multiprocessing
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

from nnunetv2_gfscreen.atomic import atomic_path, write_json
from gfscreen_lab.synthetic.anatomy import (ORGAN_HU, ORGAN_LABELS, Grid, Habitus, SmoothField, build_organ_map,
                                            organ_names_present)
from gfscreen_lab.synthetic.lesion_shapes import paint_lesions, place_lesions

DEFAULT_SHAPE = (64, 192, 192)
DEFAULT_HEALTHY_FRACTION = 0.25
MIN_SHAPE = (16, 48, 48)
SPACING_Z_MM = (2.5, 3.0)
SPACING_XY_MM = (0.7, 0.9)
NOISE_SD_HU = (10.0, 20.0)
HU_RANGE = (-1024, 3071)
_GOLDEN = 0.6180339887498949


@dataclass(frozen=True)
class ScannerProfile:
    """Ranges a case's acquisition is drawn from (uniform per case). hu_gain scales the noise-free HU about water
    (0 HU): a contrast change, as another tube voltage or contrast phase gives; hu_offset is a calibration offset
    (HU); blur_sigma_vox is the reconstruction kernel's Gaussian sigma in voxels (z, y, x)."""
    spacing_z_mm: Tuple[float, float] = SPACING_Z_MM
    spacing_xy_mm: Tuple[float, float] = SPACING_XY_MM
    noise_sd_hu: Tuple[float, float] = NOISE_SD_HU
    blur_sigma_vox: Tuple[float, float, float] = (0.35, 0.6, 0.6)
    hu_gain: Tuple[float, float] = (1.0, 1.0)
    hu_offset: Tuple[float, float] = (0.0, 0.0)
    habitus: Habitus = field(default_factory=Habitus)


REFERENCE_PROFILE = ScannerProfile()
# Another site: thinner slices and a larger display field of view (coarser in-plane spacing, the body filling
# less of it), a low-dose protocol (more noise) with a smoother kernel, a contrast-enhanced, differently
# calibrated HU scale, and a heavier population framed further cranially. Each value is a plausible protocol
# or population difference, not one chosen for how a model fares on it.
SHIFTS: Dict[str, ScannerProfile] = {
    "other_site": ScannerProfile(spacing_z_mm=(1.5, 2.0), spacing_xy_mm=(0.9, 1.05), noise_sd_hu=(22.0, 35.0),
                                 blur_sigma_vox=(0.5, 0.9, 0.9), hu_gain=(1.08, 1.2), hu_offset=(10.0, 30.0),
                                 habitus=Habitus(body_fraction=(0.35, 0.41), eccentricity=(0.62, 0.74),
                                                 fat=(0.12, 0.2), z_offset=0.15)),
}


def scanner_profile(shift: Optional[str]) -> ScannerProfile:
    """The profile of `shift` (None: the reference profile)."""
    if shift is None:
        return REFERENCE_PROFILE
    if shift not in SHIFTS:
        raise ValueError(f"shift must be one of {sorted(SHIFTS)} (or None for the reference scanner), got {shift!r}")
    return SHIFTS[shift]


def _check_shape(shape: Sequence[int]) -> Tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or any(s < m for s, m in zip(shape, MIN_SHAPE)):
        raise ValueError(f"shape must be (z, y, x) with at least {MIN_SHAPE} voxels, got {shape}")
    return shape


def _check_seed(seed: int, case_index: int) -> None:
    for name, v in (("seed", seed), ("case_index", case_index)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")


def is_healthy_case(seed: int, case_index: int, healthy_fraction: float = DEFAULT_HEALTHY_FRACTION) -> bool:
    """Whether case case_index is healthy (empty label).

    Uses a golden-ratio (Weyl) sequence with a seed-dependent offset, so any run of n consecutive cases
    holds n * healthy_fraction healthy ones to within about 2, independently of the case count.
    """
    _check_seed(seed, case_index)
    if not 0.0 <= healthy_fraction <= 1.0:
        raise ValueError(f"healthy_fraction must be in [0, 1], got {healthy_fraction}")
    offset = np.random.default_rng(np.random.SeedSequence([seed, 0, 0x4EA17])).random()
    return bool((offset + case_index * _GOLDEN) % 1.0 < healthy_fraction)


def generate_case(seed: int, case_index: int, shape: Sequence[int] = DEFAULT_SHAPE, healthy: Optional[bool] = None,
                  shift: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray, Tuple[float, float, float], dict]:
    """One synthetic CT case.

    Returns image (int16 HU, shape (z, y, x)), label (uint8 {0, 1}, same shape), spacing (z, y, x) in mm
    and info (healthy, lesion list and kinds, lesion_voxel_fraction, organ_names, organ_map (uint8
    ORGAN_LABELS values, same shape), organ_labels, origin_xyz, noise_sd_hu, shift, hu_gain, hu_offset).
    healthy=None decides by is_healthy_case with DEFAULT_HEALTHY_FRACTION. shift: a `SHIFTS` name, the case
    as another site's scanner would image another site's patient (None: the reference profile).
    """
    _check_seed(seed, case_index)
    shape = _check_shape(shape)
    profile = scanner_profile(shift)
    if healthy is None:
        healthy = is_healthy_case(seed, case_index)
    # the fourth stream (HU gain and offset) is spawned after the first three, which it leaves unchanged
    anatomy_rng, lesion_rng, noise_rng, scanner_rng = (np.random.default_rng(s) for s in
                                                       np.random.SeedSequence([seed, case_index]).spawn(4))
    sz = round(float(anatomy_rng.uniform(*profile.spacing_z_mm)), 3)
    sxy = round(float(anatomy_rng.uniform(*profile.spacing_xy_mm)), 4)
    spacing = (sz, sxy, sxy)
    fov = min(shape[1], shape[2]) * sxy
    centre = tuple(float(np.clip(anatomy_rng.normal(0, 0.015 * fov), -0.03 * fov, 0.03 * fov)) for _ in range(2))
    grid = Grid(shape, spacing, anatomy_rng.uniform(*profile.habitus.body_fraction) * fov, centre, anatomy_rng,
                z_offset=profile.habitus.z_offset)
    organ_map = build_organ_map(grid, anatomy_rng, profile.habitus)
    image = _render_tissue(organ_map, noise_rng)

    lesions: List[dict] = []
    label = np.zeros(shape, np.uint8)
    if not healthy:
        label, lesions = place_lesions(lesion_rng, organ_map, spacing)
        paint_lesions(image, lesions, spacing)
    gain, offset = (float(scanner_rng.uniform(*r)) for r in (profile.hu_gain, profile.hu_offset))
    if (gain, offset) != (1.0, 0.0):
        image *= np.float32(gain)     # about water (0 HU): tissue contrast scales, water stays put
        image += np.float32(offset)
    noise_sd = _add_acquisition_effects(image, organ_map, noise_rng, profile)
    image = np.rint(np.clip(image, *HU_RANGE)).astype(np.int16)

    origin = (-(shape[2] - 1) / 2 * sxy, -(shape[1] - 1) / 2 * sxy, -round(float(anatomy_rng.uniform(150, 450)), 1))
    info = {"case_index": case_index, "seed": seed, "healthy": bool(healthy), "shape": list(shape),
            "spacing_zyx": list(spacing), "origin_xyz": [float(o) for o in origin],
            "num_lesions": len(lesions), "lesion_kinds": [les["kind"] for les in lesions],
            "lesions": [{k: v for k, v in les.items() if not k.startswith("_")} for les in lesions],
            "lesion_voxel_fraction": float(label.sum()) / label.size, "noise_sd_hu": noise_sd,
            "organ_names": organ_names_present(organ_map), "organ_labels": dict(ORGAN_LABELS),
            "organ_map": organ_map, "shift": shift, "hu_gain": gain, "hu_offset": offset}
    return image, label, spacing, info


def _render_tissue(organ_map: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noise-free HU (float32, organ_map's shape): organ means plus smooth texture, fat stranding in the abdomen."""
    lut = np.zeros(max(ORGAN_LABELS.values()) + 1, np.float32)
    for name, value in ORGAN_LABELS.items():
        lut[value] = ORGAN_HU[name]
    image = lut[organ_map]
    texture = np.clip(SmoothField(rng, organ_map.shape, (8, 16, 16)).sample(), -2.5, 2.5)
    body = organ_map != ORGAN_LABELS["air"]
    image += 4.0 * texture * body
    fat = organ_map == ORGAN_LABELS["visceral_fat"]
    image[fat] += 12.0 * texture[fat] + 10.0 * texture[fat] ** 2   # stranding: denser patches
    return image


def _add_acquisition_effects(image: np.ndarray, organ_map: np.ndarray, rng: np.random.Generator,
                             profile: ScannerProfile = REFERENCE_PROFILE) -> float:
    """Scanner blur, smooth additive inhomogeneity inside the body and Gaussian noise, in place.

    Returns the noise sd in HU."""
    image[...] = gaussian_filter(image, sigma=profile.blur_sigma_vox)
    bias = SmoothField(rng, image.shape, (3, 3, 3)).sample() * np.float32(rng.uniform(4.0, 9.0))
    image += bias * (organ_map != ORGAN_LABELS["air"])
    sd = float(rng.uniform(*profile.noise_sd_hu))
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sd)
    return sd


def case_identifier(case_index: int) -> str:
    """nnU-Net case id of case case_index, e.g. GFS_0007."""
    return f"GFS_{case_index:04d}"


def _atomic_write(array: np.ndarray, spacing_zyx, origin_xyz, path: str, tmp_dir: str) -> None:
    """Write (z, y, x) array as NIfTI via a temporary file and a rename, so no half-written file is left behind."""
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    img.SetOrigin(tuple(float(o) for o in origin_xyz))
    img.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    with atomic_path(path, suffix=".nii.gz", tmp_dir=tmp_dir) as tmp:  # outside imagesTr: never listed as a case
        sitk.WriteImage(img, tmp, True)


def _write_case(task: Tuple[str, str, int, int, Tuple[int, int, int], bool, Optional[str]]) -> Dict:
    """Generate and write one case (worker of write_dataset); returns its summary (no arrays)."""
    folder, split, seed, case_index, shape, healthy, shift = task
    image, label, spacing, info = generate_case(seed, case_index, shape, healthy, shift)
    cid = case_identifier(case_index)
    tmp_dir = os.path.join(folder, ".partial")
    origin = info["origin_xyz"]
    _atomic_write(image, spacing, origin, os.path.join(folder, f"images{split}", f"{cid}_0000.nii.gz"), tmp_dir)
    _atomic_write(label, spacing, origin, os.path.join(folder, f"labels{split}", f"{cid}.nii.gz"), tmp_dir)
    keep = ("healthy", "spacing_zyx", "num_lesions", "lesion_kinds", "lesions", "lesion_voxel_fraction", "noise_sd_hu",
            "shift", "hu_gain", "hu_offset")
    return {"case": cid, "split": split, **{k: info[k] for k in keep}}


def write_dataset(dataset_id: int, num_train: int, num_test: int, seed: int = 0,
                  shape: Sequence[int] = DEFAULT_SHAPE, healthy_fraction: float = DEFAULT_HEALTHY_FRACTION,
                  name: str = "GFScreenSynth", raw_folder: Optional[str] = None, num_processes: int = 1,
                  overwrite: bool = False, progress: bool = True, shift: Optional[str] = None,
                  test_only: bool = False) -> str:
    """Write an nnU-Net raw dataset Dataset{id:03d}_{name} of synthetic cases and return its folder.

    Training cases are GFS_0000 .. GFS_{num_train-1} (imagesTr/labelsTr), test cases continue the
    numbering (imagesTs/labelsTs); case i is the same whatever the counts. dataset.json is written last,
    so an interrupted run leaves a dataset nnU-Net refuses. gfscreen_cases.json lists each case's lesions.
    raw_folder defaults to $nnUNet_raw. An existing folder with this id is refused; overwrite=True
    replaces one of the same name (never a different dataset that shares the id). shift: a `SHIFTS`
    name for every case (another site's scanner). test_only: write only the test cases (numbered after
    the num_train training cases, which are not written): a held-out set to predict, not to train on.
    """
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, (int, np.integer)) or not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset_id must be an integer in [1, 999], got {dataset_id!r}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name):
        raise ValueError(f"name must be letters, digits, '_' or '-', got {name!r}")
    if test_only and (num_train < 0 or num_test < 1):
        raise ValueError(f"a test-only dataset needs num_train >= 0 and num_test >= 1, got {num_train}, {num_test}")
    if not test_only and (num_train < 1 or num_test < 0):
        raise ValueError(f"need num_train >= 1 and num_test >= 0, got {num_train}, {num_test}")
    scanner_profile(shift)
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    shape = _check_shape(shape)
    healthy_flags = [is_healthy_case(seed, i, healthy_fraction) for i in range(num_train + num_test)]
    if raw_folder is None:
        from nnunetv2.paths import nnUNet_raw
        if not nnUNet_raw:
            raise RuntimeError("raw_folder not given and the environment variable nnUNet_raw is not set")
        raw_folder = os.fspath(nnUNet_raw)
    dataset_name = f"Dataset{dataset_id:03d}_{name}"
    folder = os.path.join(raw_folder, dataset_name)
    clashes = [d for d in (os.listdir(raw_folder) if os.path.isdir(raw_folder) else [])
               if d.startswith(f"Dataset{dataset_id:03d}_") and os.path.isdir(os.path.join(raw_folder, d))]
    others = [d for d in clashes if d != dataset_name]
    if others:
        raise FileExistsError(f"dataset id {dataset_id} is already used by {others} in {raw_folder}; "
                              f"nnU-Net could not tell the datasets apart. Pick another id or remove it")
    if clashes:
        if not overwrite:
            raise FileExistsError(f"{folder} exists; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(folder)
    for sub in ("imagesTs", "labelsTs", ".partial") if test_only else \
            ("imagesTr", "labelsTr", "imagesTs", "labelsTs", ".partial"):
        os.makedirs(os.path.join(folder, sub))

    tasks = [(folder, "Tr" if i < num_train else "Ts", seed, i, shape, h, shift) for i, h in enumerate(healthy_flags)
             if not (test_only and i < num_train)]
    bar = tqdm(total=len(tasks), desc=f"writing {dataset_name}", disable=not progress)
    if num_processes == 1:
        summaries = []
        for t in tasks:
            summaries.append(_write_case(t))
            bar.update()
    else:
        with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
            summaries = []
            for s in pool.imap(_write_case, tasks):
                summaries.append(s)
                bar.update()
    bar.close()

    write_json({s["case"]: s for s in summaries}, os.path.join(folder, "gfscreen_cases.json"), indent=2)
    shutil.rmtree(os.path.join(folder, ".partial"))
    write_json({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "lesion": 1},
        "numTraining": 0 if test_only else num_train, "file_ending": ".nii.gz", "name": dataset_name,
        "numTest": num_test,
        "description": "Synthetic pan-cancer CT phantom (gfscreen_lab.synthetic); not real patient data",
        "gfscreen_synthetic": {"seed": seed, "shape_zyx": list(shape), "healthy_fraction": healthy_fraction,
                               "shift": shift, "test_only": test_only, "first_test_case": num_train},
    }, os.path.join(folder, "dataset.json"), indent=2)
    return folder


def make_dataset_entry_point() -> None:
    """`python -m gfscreen_lab.synthetic.dataset`: write a synthetic pan-cancer CT
    dataset into $nnUNet_raw."""
    parser = argparse.ArgumentParser(prog="python -m gfscreen_lab.synthetic.dataset",
                                     description="Write a synthetic pan-cancer CT dataset (nnU-Net raw format, "
                                                 "FLARE-style binary lesion labels) into $nnUNet_raw.")
    parser.add_argument("-d", type=int, required=True, help="dataset id (1-999)")
    parser.add_argument("--name", type=str, default="GFScreenSynth", help="dataset name after the id")
    parser.add_argument("-ntr", type=int, default=20, help="number of training cases (imagesTr/labelsTr)")
    parser.add_argument("-nts", type=int, default=5, help="number of test cases (imagesTs/labelsTs)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed gives identical data")
    parser.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE), metavar=("Z", "Y", "X"),
                        help="volume shape in voxels")
    parser.add_argument("--healthy_fraction", type=float, default=DEFAULT_HEALTHY_FRACTION,
                        help="share of cases without lesions (empty label)")
    parser.add_argument("--shift", type=str, default=None, choices=sorted(SHIFTS),
                        help="image every case as another site's scanner would (spacing, noise, blur, HU offset and "
                             "contrast, body habitus); the lesions and labels follow the same rules")
    parser.add_argument("--test_only", action="store_true",
                        help="write only the -nts test cases (numbered after the -ntr training cases, which are not "
                             "written): a held-out test set")
    parser.add_argument("-np", type=int, default=1, help="number of worker processes")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset of the same id and name")
    args = parser.parse_args()
    folder = write_dataset(args.d, args.ntr, args.nts, args.seed, args.shape, args.healthy_fraction, args.name,
                           num_processes=args.np, overwrite=args.overwrite, shift=args.shift,
                           test_only=args.test_only)
    print(f"wrote {folder}")


if __name__ == "__main__":
    make_dataset_entry_point()
