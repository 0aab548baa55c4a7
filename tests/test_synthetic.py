import json
import os
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import binary_dilation, binary_erosion

from gfscreen_lab.synthetic.dataset import (DEFAULT_SHAPE, case_identifier, generate_case, is_healthy_case,
                                            make_dataset_entry_point, write_dataset)
from gfscreen_lab.synthetic.anatomy import ORGAN_GROUPS, ORGAN_HU, ORGAN_LABELS
from gfscreen_lab.synthetic.lesion_shapes import LESION_FRACTION_RANGE, LESION_KINDS

SMALL = (32, 96, 96)
TINY = (16, 48, 48)


def test_same_seed_gives_identical_arrays_and_other_seeds_differ():
    a = generate_case(3, 1, SMALL, healthy=False)
    b = generate_case(3, 1, SMALL, healthy=False)
    assert a[0].dtype == np.int16 and a[1].dtype == np.uint8 and a[0].shape == a[1].shape == SMALL
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    assert a[2] == b[2] and a[3]["lesions"] == b[3]["lesions"]
    for other in (generate_case(4, 1, SMALL, healthy=False), generate_case(3, 2, SMALL, healthy=False)):
        assert not np.array_equal(other[0], a[0]) and not np.array_equal(other[1], a[1])


def test_spacing_is_realistic_and_anisotropic():
    for i in range(5):
        _, _, (sz, sy, sx), _ = generate_case(0, i, TINY, healthy=True)
        assert 2.5 <= sz <= 3.0 and 0.7 <= sy <= 0.9 and sy == sx


def test_hu_of_air_and_organs_is_plausible():
    image, label, _, info = generate_case(1, 0, SMALL, healthy=True)
    om = info["organ_map"]
    assert label.sum() == 0 and info["num_lesions"] == 0
    air = image[om == ORGAN_LABELS["air"]]
    assert air.size > 0.3 * image.size and -1010 <= air.mean() <= -985
    corner = image[:, :5, :5]             # outside the elliptical body
    assert np.all(om[:, :5, :5] == 0) and abs(corner.mean() + 1000) < 15
    for organ in ("liver", "spleen", "lung", "subcutaneous_fat", "muscle", "aorta", "bowel", "vertebra"):
        core = binary_erosion(om == ORGAN_LABELS[organ])
        assert core.sum() > 20, organ
        assert abs(image[core].mean() - ORGAN_HU[organ]) < 25, (organ, image[core].mean())
    noise_sd = image[binary_erosion(om == ORGAN_LABELS["liver"], iterations=2)].std()
    assert 8 < noise_sd < 30
    # cranial end holds lung, caudal end does not
    lung = om == ORGAN_LABELS["lung"]
    assert lung[-1].sum() > 0.1 * lung[-1].size and lung[0].sum() == 0


def test_lesions_lie_in_their_host_organs_and_are_visible():
    host_values = {ORGAN_LABELS[n] for k in LESION_KINDS.values() for n in ORGAN_GROUPS.get(k.host, (k.host,))}
    checked_contrast = 0
    for i in range(8):
        image, label, _, info = generate_case(2, i, SMALL, healthy=False)
        om = info["organ_map"]
        assert info["num_lesions"] >= 1 and set(np.unique(label)) == {0, 1}
        assert set(np.unique(om[label > 0]).tolist()) <= host_values
        assert info["lesion_voxel_fraction"] == pytest.approx(label.sum() / label.size)
        assert sum(les["num_voxels"] for les in info["lesions"]) >= label.sum()   # overlaps count once
        les = info["lesions"][0]
        host_hu = np.mean([ORGAN_HU[n] for n in ORGAN_GROUPS.get(les["host"], (les["host"],))])
        if info["num_lesions"] == 1 and les["num_voxels"] >= 50 and abs(les["hu"] - host_hu) > 25:
            inside = image[label > 0].mean()   # blurred edge and noise, but closer to the lesion than the organ
            assert abs(inside - les["hu"]) < abs(inside - host_hu), (les, inside)
            checked_contrast += 1
    assert checked_contrast >= 1


def test_healthy_twin_differs_only_near_the_lesions():
    """Anatomy, lesions and noise use separate streams: removing the lesions changes nothing far from them."""
    sick, label, _, info = generate_case(5, 3, SMALL, healthy=False)
    well, empty, _, info_w = generate_case(5, 3, SMALL, healthy=True)
    assert empty.sum() == 0 and label.sum() > 0
    assert np.array_equal(info["organ_map"], info_w["organ_map"])
    near = binary_dilation(label > 0, np.ones((5, 9, 9), bool))   # blur and soft edge reach < 4 voxels
    assert np.array_equal(sick[~near], well[~near])
    assert not np.array_equal(sick[label > 0], well[label > 0])


def test_lesion_fraction_at_default_shape():
    assert DEFAULT_SHAPE == (64, 192, 192)
    lo, hi = LESION_FRACTION_RANGE
    assert (lo, hi) == (2e-4, 3e-3)
    fractions = []
    for i in range(4):
        _, label, _, info = generate_case(0, i, healthy=False)
        assert label.shape == DEFAULT_SHAPE
        fractions.append(label.sum() / label.size)
        assert lo <= fractions[-1] <= hi, (i, fractions[-1], info["lesions"])
    assert len(set(fractions)) == len(fractions)


def test_healthy_share_follows_fraction_independently_of_count():
    for seed in range(3):
        flags = [is_healthy_case(seed, i, 0.25) for i in range(100)]
        assert abs(sum(flags[:20]) - 5) <= 2 and abs(sum(flags) - 25) <= 2
    assert not any(is_healthy_case(0, i, 0.0) for i in range(50))
    assert all(is_healthy_case(0, i, 1.0) for i in range(50))
    for i in range(4):   # healthy=None follows is_healthy_case with the default 25 %
        _, label, _, info = generate_case(0, i, TINY)
        assert info["healthy"] == is_healthy_case(0, i) == (label.sum() == 0)


@pytest.mark.parametrize("call, match", [
    (lambda: generate_case(0, 0, (8, 96, 96)), "shape"),
    (lambda: generate_case(-1, 0, TINY), "seed"),
    (lambda: generate_case(0, -2, TINY), "case_index"),
    (lambda: is_healthy_case(0, 0, 1.5), "healthy_fraction"),
    (lambda: write_dataset(0, 1, 0, raw_folder="/nonexistent"), "dataset_id"),
    (lambda: write_dataset(5, 1, 0, name="a/b", raw_folder="/nonexistent"), "name"),
    (lambda: write_dataset(5, 0, 0, raw_folder="/nonexistent"), "num_train"),
])
def test_bad_input_is_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_write_dataset_passes_nnunet_integrity_check(tmp_path, monkeypatch):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    folder = write_dataset(17, 3, 1, seed=4, shape=TINY, healthy_fraction=0.25, raw_folder=str(tmp_path),
                           progress=False)
    assert os.path.basename(folder) == "Dataset017_GFScreenSynth"
    verify_dataset_integrity(folder, num_processes=1)
    dj = json.load(open(os.path.join(folder, "dataset.json")))
    assert dj["channel_names"] == {"0": "CT"} and dj["labels"] == {"background": 0, "lesion": 1}
    assert dj["numTraining"] == 3 and dj["file_ending"] == ".nii.gz"
    assert sorted(os.listdir(os.path.join(folder, "imagesTr"))) == [f"GFS_000{i}_0000.nii.gz" for i in range(3)]
    assert os.listdir(os.path.join(folder, "labelsTs")) == ["GFS_0003.nii.gz"]
    assert not os.path.exists(os.path.join(folder, ".partial"))
    cases = json.load(open(os.path.join(folder, "gfscreen_cases.json")))
    for i in range(4):
        split = "Tr" if i < 3 else "Ts"
        img = sitk.ReadImage(os.path.join(folder, f"images{split}", f"{case_identifier(i)}_0000.nii.gz"))
        lab = sitk.ReadImage(os.path.join(folder, f"labels{split}", f"{case_identifier(i)}.nii.gz"))
        image, label, spacing, info = generate_case(4, i, TINY, healthy=is_healthy_case(4, i, 0.25))
        assert np.allclose(img.GetSpacing(), spacing[::-1]) and np.allclose(lab.GetSpacing(), spacing[::-1])
        assert np.allclose(img.GetOrigin(), info["origin_xyz"])
        assert np.array_equal(sitk.GetArrayFromImage(img), image)       # case i independent of the case count
        assert np.array_equal(sitk.GetArrayFromImage(lab), label)
        assert cases[case_identifier(i)]["num_lesions"] == info["num_lesions"]
    # existing ids are refused unless overwrite=True; a different dataset with the same id always
    with pytest.raises(FileExistsError, match="overwrite"):
        write_dataset(17, 1, 0, shape=TINY, raw_folder=str(tmp_path), progress=False)
    folder = write_dataset(17, 1, 0, shape=TINY, raw_folder=str(tmp_path), progress=False, overwrite=True)
    assert len(os.listdir(os.path.join(folder, "imagesTr"))) == 1
    with pytest.raises(FileExistsError, match="Dataset017_GFScreenSynth"):
        write_dataset(17, 1, 0, shape=TINY, name="Other", raw_folder=str(tmp_path), overwrite=True)
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(RuntimeError, match="nnUNet_raw"):
        write_dataset(18, 1, 0, shape=TINY, progress=False)


def test_cli_writes_into_nnunet_raw_with_workers(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["nnUNetv2_gfscreen_make_dataset", "-d", "7", "--name", "Cli", "-ntr", "2",
                                      "-nts", "0", "--seed", "9", "--shape", *map(str, TINY),
                                      "--healthy_fraction", "0", "-np", "2"])
    make_dataset_entry_point()
    folder = tmp_path / "Dataset007_Cli"
    for i in range(2):
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / f"GFS_000{i}.nii.gz")))
        assert np.array_equal(lab, generate_case(9, i, TINY, healthy=False)[1]) and lab.sum() > 0


def test_shifted_cases_are_imaged_differently_and_keep_binary_lesion_labels():
    """The other site's profile: other spacing, more noise, a HU offset and contrast, another body; deterministic;
    lesion cases still hold lesions in binary labels, healthy ones none."""
    from gfscreen_lab.synthetic.dataset import SHIFTS
    profile = SHIFTS["other_site"]
    liver_means, liver_sds = {None: [], "other_site": []}, {None: [], "other_site": []}
    body_share = {None: [], "other_site": []}
    for i in range(4):
        for shift in (None, "other_site"):
            image, label, spacing, info = generate_case(6, i, SMALL, healthy=False, shift=shift)
            if shift is None:
                assert 2.5 <= spacing[0] <= 3.0 and 0.7 <= spacing[1] <= 0.9
                assert (info["hu_gain"], info["hu_offset"]) == (1.0, 0.0)
            else:
                assert profile.spacing_z_mm[0] <= spacing[0] <= profile.spacing_z_mm[1] < 2.5
                assert 0.9 <= profile.spacing_xy_mm[0] <= spacing[1] <= profile.spacing_xy_mm[1]
                assert 1.08 <= info["hu_gain"] <= 1.2 and 10 <= info["hu_offset"] <= 30
            assert info["shift"] == shift
            assert set(np.unique(label).tolist()) == {0, 1} and info["num_lesions"] >= 1
            om = info["organ_map"]
            liver = binary_erosion(om == ORGAN_LABELS["liver"], iterations=2)
            liver_means[shift].append(image[liver].mean())
            liver_sds[shift].append(image[liver].std())
            body_share[shift].append((om != ORGAN_LABELS["air"]).mean())
        _, empty, _, _ = generate_case(6, i, SMALL, healthy=True, shift="other_site")
        assert empty.sum() == 0
    # liver 60 HU -> 60 * gain + offset >= 74.8; noise sd 22-35 HU against 10-20; a smaller body in the field of view
    assert min(liver_means["other_site"]) > max(liver_means[None]) + 5
    assert min(liver_sds["other_site"]) > max(liver_sds[None])
    assert np.mean(body_share["other_site"]) < np.mean(body_share[None]) - 0.05   # body fraction 0.35-0.41 vs 0.41-0.45
    a = generate_case(6, 1, TINY, healthy=False, shift="other_site")
    b = generate_case(6, 1, TINY, healthy=False, shift="other_site")
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes() and a[2] == b[2]
    with pytest.raises(ValueError, match="other_site"):
        generate_case(6, 1, TINY, shift="nope")


def test_test_only_dataset_holds_the_shifted_test_cases(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["nnUNetv2_gfscreen_make_dataset", "-d", "8", "-ntr", "5", "-nts", "2",
                                      "--seed", "3", "--shape", *map(str, TINY), "--shift", "other_site",
                                      "--test_only"])
    make_dataset_entry_point()
    folder = tmp_path / "Dataset008_GFScreenSynth"
    assert sorted(os.listdir(folder)) == ["dataset.json", "gfscreen_cases.json", "imagesTs", "labelsTs"]
    assert sorted(os.listdir(folder / "imagesTs")) == ["GFS_0005_0000.nii.gz", "GFS_0006_0000.nii.gz"]
    dj = json.load(open(folder / "dataset.json"))
    assert dj["numTraining"] == 0 and dj["gfscreen_synthetic"]["shift"] == "other_site"
    for i in (5, 6):   # the same cases as the full dataset's test cases with this shift
        image, label, spacing, _ = generate_case(3, i, TINY, shift="other_site")
        img = sitk.ReadImage(str(folder / "imagesTs" / f"GFS_000{i}_0000.nii.gz"))
        assert np.array_equal(sitk.GetArrayFromImage(img), image) and np.allclose(img.GetSpacing(), spacing[::-1])
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTs" / f"GFS_000{i}.nii.gz")))
        assert np.array_equal(lab, label)
    with pytest.raises(ValueError, match="test-only"):
        write_dataset(9, 5, 0, shape=TINY, raw_folder=str(tmp_path), test_only=True)
