"""FLARE pan-cancer voxel metrics: lesion DSC and normalised surface Dice (NSD).

All arrays are binary 3D masks in array index order (z, y, x), as SimpleITK's
``GetArrayFromImage`` returns them; every spacing here is in the same (z, y, x) order
(SimpleITK's ``GetSpacing`` is (x, y, z) and must be reversed by the caller).
"""
from typing import Sequence, Tuple

import numpy as np
from scipy import ndimage

FLARE_NSD_TOLERANCE_MM = 2.0
FLARE_NSD_MIN_DSC = 0.2  # FLARE sets NSD to 0 when the DSC is below this


def _check_pair(gt: np.ndarray, pred: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    gt = np.asarray(gt).astype(bool, copy=False)
    pred = np.asarray(pred).astype(bool, copy=False)
    if gt.shape != pred.shape:
        raise ValueError(f"gt and pred must have the same shape, got {gt.shape} and {pred.shape}")
    if gt.ndim != 3:
        raise ValueError(f"masks must be 3D (z, y, x), got shape {gt.shape}")
    return gt, pred


def _check_spacing(spacing_zyx: Sequence[float]) -> Tuple[float, float, float]:
    spacing = tuple(float(s) for s in spacing_zyx)
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_zyx must be three positive numbers, got {tuple(spacing_zyx)}")
    return spacing


def dice(gt: np.ndarray, pred: np.ndarray) -> float:
    """FLARE lesion DSC ``2|G & P| / (|G| + |P|)`` of two (z, y, x) masks.

    Both empty -> 1.0 (a healthy case correctly left empty); exactly one empty -> 0.0.
    """
    gt, pred = _check_pair(gt, pred)
    n_gt, n_pred = int(gt.sum()), int(pred.sum())
    if n_gt == 0 and n_pred == 0:
        return 1.0
    if n_gt == 0 or n_pred == 0:
        return 0.0
    return 2.0 * int(np.logical_and(gt, pred).sum()) / (n_gt + n_pred)


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of a (z, y, x) mask: ``mask XOR erode(mask)``.

    The erosion uses the 6-neighbourhood, so a voxel is on the surface when at least one face
    neighbour is background; outside the array counts as background, so a mask touching the
    array border has surface there.
    """
    mask = np.asarray(mask, dtype=bool)
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1),
                                    border_value=0)
    return np.logical_xor(mask, eroded)


def _union_crop(gt: np.ndarray, pred: np.ndarray) -> Tuple[slice, ...]:
    """Bounding box of ``gt | pred``: surfaces and distances computed inside it equal those of
    the full volume, so a CT with small lesions needs no whole-volume distance transform.

    Exact because every surface voxel of either mask lies inside the box, and a mask voxel on the
    box edge has a background face neighbour just outside it, so it is surface either way.
    """
    union = np.logical_or(gt, pred)
    box = []
    for axis in range(3):
        hit = np.flatnonzero(union.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def normalized_surface_dice(gt: np.ndarray, pred: np.ndarray, spacing_zyx: Sequence[float],
                            tolerance_mm: float = FLARE_NSD_TOLERANCE_MM) -> float:
    """Normalised surface Dice of two (z, y, x) masks at ``tolerance_mm``.

    ``NSD = (|S_G within tol of S_P| + |S_P within tol of S_G|) / (|S_G| + |S_P|)`` where S are the
    surface voxels (``surface_voxels``) and distances are Euclidean in mm, using ``spacing_zyx``
    (so anisotropic spacing is respected). A distance equal to the tolerance counts as within.
    Both empty -> 1.0; exactly one empty -> 0.0. No DSC threshold here (see ``flare_dsc_nsd``).
    """
    gt, pred = _check_pair(gt, pred)
    spacing = _check_spacing(spacing_zyx)
    if not np.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise ValueError(f"tolerance_mm must be a finite number >= 0, got {tolerance_mm}")
    gt_any, pred_any = bool(gt.any()), bool(pred.any())
    if not gt_any and not pred_any:
        return 1.0
    if not gt_any or not pred_any:
        return 0.0
    crop = _union_crop(gt, pred)
    surf_gt, surf_pred = surface_voxels(gt[crop]), surface_voxels(pred[crop])
    # distance (mm) from every voxel to the nearest surface voxel of the other mask
    dist_to_gt = ndimage.distance_transform_edt(~surf_gt, sampling=spacing)
    dist_to_pred = ndimage.distance_transform_edt(~surf_pred, sampling=spacing)
    n_ok = (int((dist_to_pred[surf_gt] <= tolerance_mm).sum())
            + int((dist_to_gt[surf_pred] <= tolerance_mm).sum()))
    return n_ok / (int(surf_gt.sum()) + int(surf_pred.sum()))


def flare_dsc_nsd(gt: np.ndarray, pred: np.ndarray, spacing_zyx: Sequence[float],
                  tolerance_mm: float = FLARE_NSD_TOLERANCE_MM) -> Tuple[float, float]:
    """FLARE scoring of one case: ``(DSC, NSD)``; NSD is 0 when DSC < 0.2.

    ``spacing_zyx`` is the ground truth's spacing in array order (z, y, x).
    """
    dsc = dice(gt, pred)
    if dsc < FLARE_NSD_MIN_DSC:
        return dsc, 0.0
    return dsc, normalized_surface_dice(gt, pred, spacing_zyx, tolerance_mm)
