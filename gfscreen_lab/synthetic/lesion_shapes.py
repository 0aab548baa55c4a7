"""Lesions for synthetic CT cases: perturbed ellipsoids in mm, placed inside host organs of the phantom.

The label of a lesion is the binary blob clipped to its host organ; the image gets the same blob with
a soft edge (a linear ramp `EDGE_MM` wide centred on the label boundary), so boundaries look blurred
while the label stays binary. Radii are drawn in mm per kind; the whole set is then scaled (at most
2x either way) so that the expected lesion volume lies in a target band of the volume's voxels, and
a set whose measured fraction falls outside `LESION_FRACTION_RANGE` is drawn again.
"""
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
from scipy.ndimage import distance_transform_edt

from gfscreen_lab.synthetic.anatomy import ORGAN_GROUPS, ORGAN_LABELS


@dataclass(frozen=True)
class LesionKind:
    host: str                          # organ name or ORGAN_GROUPS key
    radius_mm: Tuple[float, float]     # mean radius range
    hu: Tuple[float, float]            # lesion core HU range
    rim_hu: float = 0.0                # added on the outer quarter (rim enhancement)
    weight: float = 1.0                # relative frequency


LESION_KINDS: Dict[str, LesionKind] = {
    "liver_metastasis_hypodense": LesionKind("liver", (4.0, 11.0), (15.0, 35.0), rim_hu=15.0, weight=0.28),
    "liver_lesion_hyperdense": LesionKind("liver", (4.0, 10.0), (95.0, 125.0), weight=0.14),
    "kidney_cyst": LesionKind("kidney", (3.5, 8.0), (0.0, 15.0), weight=0.13),
    "kidney_tumour": LesionKind("kidney", (4.0, 9.0), (15.0, 30.0), rim_hu=10.0, weight=0.12),
    "pancreas_hypodense": LesionKind("pancreas", (3.5, 7.0), (10.0, 25.0), weight=0.13),
    "spleen_hypodense": LesionKind("spleen", (3.5, 8.0), (15.0, 30.0), weight=0.08),
    "lung_nodule": LesionKind("lung", (2.5, 6.0), (0.0, 50.0), weight=0.12),
}
LESION_FRACTION_RANGE = (2e-4, 3e-3)    # accepted lesion voxel fraction of a lesion case
TARGET_FRACTION_BAND = (4e-4, 2e-3)     # band the expected volume is scaled into
LESION_COUNT_P = (0.35, 0.3, 0.2, 0.15)  # P(1, 2, 3, 4 lesions)
EDGE_MM = 1.5
MAX_ATTEMPTS = 8
MIN_HOST_VOXELS = 200


def host_mask(organ_map: np.ndarray, host: str) -> np.ndarray:
    """Boolean mask (organ_map's shape) of a host organ name or ORGAN_GROUPS key."""
    names = ORGAN_GROUPS.get(host, (host,))
    return np.isin(organ_map, [ORGAN_LABELS[n] for n in names])


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.standard_normal(4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]], np.float32)


class _Host:
    """A host organ's mask and in-mm distance-to-boundary map, cropped to its bounding box."""

    def __init__(self, mask: np.ndarray, spacing):
        idx = [np.flatnonzero(mask.any(axis=tuple(b for b in range(3) if b != a))) for a in range(3)]
        self.offset = tuple(int(i[0]) for i in idx)
        self.box = tuple(slice(int(i[0]), int(i[-1]) + 1) for i in idx)
        self.dist = distance_transform_edt(np.pad(mask[self.box], 1), sampling=spacing)[1:-1, 1:-1, 1:-1]

    def sample_centre(self, rng: np.random.Generator, clearance_mm: float) -> Tuple[Tuple[int, int, int], float]:
        """A uniform voxel at least clearance_mm deep in the organ (else among the deepest) and its depth in mm."""
        dmax = float(self.dist.max())
        cand = np.flatnonzero(self.dist.ravel() >= min(clearance_mm, 0.8 * dmax))
        pick = int(cand[rng.integers(len(cand))])
        local = np.unravel_index(pick, self.dist.shape)
        return tuple(int(o + l) for o, l in zip(self.offset, local)), float(self.dist[local])


def _draw_set(rng: np.random.Generator, kinds: List[str], spacing, num_voxels: int):
    """Kinds and semi-axes (mm, (n, 3)) of a lesion set, scaled towards TARGET_FRACTION_BAND."""
    p = np.array(LESION_COUNT_P)
    n = int(rng.choice(np.arange(1, len(p) + 1), p=p / p.sum()))
    w = np.array([LESION_KINDS[k].weight for k in kinds])
    chosen = [kinds[i] for i in rng.choice(len(kinds), size=n, p=w / w.sum())]
    axes = np.array([rng.uniform(*LESION_KINDS[k].radius_mm) * rng.uniform(0.75, 1.25, 3) for k in chosen])
    expected = float((4 / 3 * np.pi * axes.prod(1)).sum() / np.prod(spacing))
    lo, hi = (b * num_voxels for b in TARGET_FRACTION_BAND)
    target = min(max(expected, lo), hi)
    axes *= float(np.clip((target / expected) ** (1 / 3), 0.5, 2.0))
    return chosen, axes


def _blob(rng: np.random.Generator, shape, spacing, centre, axes_mm) -> Tuple[tuple, np.ndarray]:
    """Box and normalised radius rho (< 1 inside) of a rotated, harmonically perturbed ellipsoid."""
    reach = axes_mm.max() * 1.3 + EDGE_MM
    box = tuple(slice(max(c - int(np.ceil(reach / s)), 0), min(c + int(np.ceil(reach / s)) + 1, n))
                for c, s, n in zip(centre, spacing, shape))
    coords = [((np.arange(b.start, b.stop) - c) * s).astype(np.float32) for b, c, s in zip(box, centre, spacing)]
    rot = _random_rotation(rng)
    p = [sum(rot[i, j] * coords[j].reshape([-1 if a == j else 1 for a in range(3)]) for j in range(3)) / axes_mm[i]
         for i in range(3)]
    rho = np.sqrt(p[0] ** 2 + p[1] ** 2 + p[2] ** 2)
    pert = np.zeros_like(rho)
    for _ in range(3):
        omega, amp = rng.normal(0, 2.0, 3), rng.uniform(0, 0.08)
        pert += amp * np.cos(omega[0] * p[0] + omega[1] * p[1] + omega[2] * p[2] + rng.uniform(0, 2 * np.pi))
    return box, rho / (1 + pert)


def place_lesions(rng: np.random.Generator, organ_map: np.ndarray, spacing) -> Tuple[np.ndarray, List[dict]]:
    """Draw and rasterise a lesion set for a (z, y, x) organ map with spacing (z, y, x) in mm.

    Returns the uint8 label (organ_map's shape) and one dict per lesion (kind, host, centre_zyx, axes_mm,
    hu, num_voxels, plus private '_box', '_rho', '_host' for paint_lesions). Raises ValueError when no
    host organ of any kind is present.
    """
    counts = np.bincount(organ_map.ravel(), minlength=max(ORGAN_LABELS.values()) + 1)
    host_names = sorted({kind.host for kind in LESION_KINDS.values()})
    present = {h for h in host_names
               if sum(counts[ORGAN_LABELS[n]] for n in ORGAN_GROUPS.get(h, (h,))) >= MIN_HOST_VOXELS}
    kinds = [k for k, kind in LESION_KINDS.items() if kind.host in present]
    if not kinds:
        raise ValueError(f"no lesion host organ {host_names} has {MIN_HOST_VOXELS} voxels in the organ map")
    hosts: Dict[str, _Host] = {}   # built on first use: the distance transform is the slow part
    lo, hi = (f * organ_map.size for f in LESION_FRACTION_RANGE)
    for attempt in range(MAX_ATTEMPTS):
        label = np.zeros(organ_map.shape, np.uint8)
        lesions = []
        for kind_name, axes in zip(*_draw_set(rng, kinds, spacing, organ_map.size)):
            kind = LESION_KINDS[kind_name]
            if kind.host not in hosts:
                hosts[kind.host] = _Host(host_mask(organ_map, kind.host), spacing)
            host = hosts[kind.host]
            centre, depth = host.sample_centre(rng, 0.8 * float(axes.mean()))
            axes = axes * min(1.0, depth / (0.8 * float(axes.mean())))
            box, rho = _blob(rng, organ_map.shape, spacing, centre, axes)
            in_host = host_mask(organ_map[box], kind.host)
            blob = (rho < 1) & in_host
            label[box][blob] = 1
            lesions.append({"kind": kind_name, "host": kind.host, "centre_zyx": list(centre),
                            "axes_mm": [round(float(a), 2) for a in axes], "hu": float(rng.uniform(*kind.hu)),
                            "num_voxels": int(blob.sum()), "_box": box, "_rho": rho, "_host": in_host})
        total = int(label.sum())
        if lo <= total <= hi:
            break
    return label, lesions


def paint_lesions(image: np.ndarray, lesions: List[dict], spacing) -> None:
    """Blend each lesion's HU into image (float32 (z, y, x), in place) with a soft edge, inside its host only."""
    for les in lesions:
        kind = LESION_KINDS[les["kind"]]
        rho = les["_rho"]
        ramp_width = EDGE_MM / max(float(np.mean(les["axes_mm"])), 1e-3)   # edge width in rho units
        w = np.clip(0.5 - (rho - 1) / ramp_width, 0, 1) * les["_host"]
        value = les["hu"] + kind.rim_hu * (rho > 0.75)
        sub = image[les["_box"]]
        sub += w * (value - sub)
