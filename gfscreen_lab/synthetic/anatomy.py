"""A randomised parametric abdomen phantom: the organ map that synthetic CT cases are painted from.

Geometry lives in normalised coordinates so that the body always fits the field of view whatever the
grid shape and spacing: in-plane, x (patient right -> left) and y (anterior -> posterior) are in units
of the body half-width (isotropic, so circles stay circles); z (caudal -> cranial) runs from -1 to 1
over the field of view. Array axes are (z, y, x); with an identity direction this is LPS, as in
SimpleITK. Organs are perturbed ellipsoids; the shapes vary smoothly per case through one random
displacement field and per-organ surface noise, all built from separable Gaussian-RBF fields.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

# organ map values; several map to one host organ for lesions (see ORGAN_GROUPS)
ORGAN_LABELS: Dict[str, int] = {
    "air": 0, "subcutaneous_fat": 1, "muscle": 2, "visceral_fat": 3, "liver": 4, "spleen": 5,
    "kidney_cortex": 6, "kidney_medulla": 7, "pancreas": 8, "aorta": 9, "vertebra": 10,
    "cortical_bone": 11, "disc": 12, "lung": 13, "bowel": 14, "bowel_gas": 15,
}
# mean HU per organ map value (unenhanced-like abdomen CT)
ORGAN_HU: Dict[str, float] = {
    "air": -1000., "subcutaneous_fat": -100., "muscle": 40., "visceral_fat": -85., "liver": 60.,
    "spleen": 50., "kidney_cortex": 55., "kidney_medulla": 30., "pancreas": 40., "aorta": 45.,
    "vertebra": 450., "cortical_bone": 900., "disc": 80., "lung": -850., "bowel": 20., "bowel_gas": -950.,
}
ORGAN_GROUPS: Dict[str, Tuple[str, ...]] = {"kidney": ("kidney_cortex", "kidney_medulla")}


@dataclass(frozen=True)
class Habitus:
    """The population a site scans and how it frames them: ranges the phantom's body is drawn from.

    body_fraction: body half-width / in-plane field of view (a larger display field of view gives a smaller
    fraction); eccentricity: body depth / width; fat: subcutaneous fat thickness (normalised); z_offset: where
    the field of view sits along the body (normalised, > 0 further cranial: more lung and liver dome)."""
    body_fraction: Tuple[float, float] = (0.41, 0.45)
    eccentricity: Tuple[float, float] = (0.68, 0.8)
    fat: Tuple[float, float] = (0.07, 0.14)
    z_offset: float = 0.0


class SmoothField:
    """Smooth random field N(0, 1) at every voxel of a (z, y, x) grid, sampled lazily per box.

    field = sum_ijk c_ijk bz_i(z) by_j(y) bx_k(x) with iid N(0, 1) coefficients on a coarse control
    grid and Gaussian radial bases whose squared weights sum to 1 per axis, so every voxel is
    exactly N(0, 1); evaluation is three small matrix products (no full-size interpolation).
    """

    def __init__(self, rng: np.random.Generator, shape: Tuple[int, int, int], n_ctrl: Tuple[int, int, int]):
        self.bases = [self._basis(n, c) for n, c in zip(shape, n_ctrl)]
        self.coef = rng.standard_normal(tuple(n_ctrl)).astype(np.float32)

    @staticmethod
    def _basis(n: int, n_ctrl: int) -> np.ndarray:
        pos = np.arange(n, dtype=np.float64)[:, None]
        ctrl = np.linspace(-0.5, n - 0.5, n_ctrl)[None, :]
        width = max((n - 1) / max(n_ctrl - 1, 1), 1.0)
        b = np.exp(-0.5 * ((pos - ctrl) / width) ** 2)
        return (b / np.sqrt((b ** 2).sum(1, keepdims=True))).astype(np.float32)

    def sample(self, box: Optional[Tuple[slice, slice, slice]] = None) -> np.ndarray:
        """Field values in box (three slices, z y x); whole grid if None. Returns float32 (z', y', x')."""
        box = box or (slice(None),) * 3
        bz, by, bx = (b[s] for b, s in zip(self.bases, box))
        t = self.coef @ bx.T                      # (cz, cy, x')
        t = by @ t                                # (cz, y', x')
        return np.tensordot(bz, t, axes=(1, 0))   # (z', y', x')


class Grid:
    """Voxel grid with normalised, smoothly displaced coordinates (see module docstring).

    shape and spacing are (z, y, x); half_width_mm is the body half-width in mm; the body centre sits
    at centre_mm (y, x) relative to the in-plane grid centre; z_offset (normalised) moves the field of view along
    the body (> 0: cranially).
    """

    def __init__(self, shape, spacing, half_width_mm: float, centre_mm: Tuple[float, float],
                 rng: np.random.Generator, displacement: float = 0.035, z_offset: float = 0.0):
        self.shape, self.spacing = tuple(shape), tuple(spacing)
        nz, ny, nx = shape
        sz, sy, sx = spacing
        self.z_scale = (nz - 1) * sz / 2 or 1.0
        self.half_width = half_width_mm
        # index k -> normalised coordinate: (k - origin) * step
        self.step = (sz / self.z_scale, sy / half_width_mm, sx / half_width_mm)
        self.origin = ((nz - 1) / 2 - z_offset / self.step[0], (ny - 1) / 2 + centre_mm[0] / sy,
                       (nx - 1) / 2 + centre_mm[1] / sx)
        axes = [((np.arange(n) - o) * s).astype(np.float32) for n, o, s in zip(shape, self.origin, self.step)]
        self.max_disp = 3 * displacement
        disp = [np.clip(SmoothField(rng, shape, (4, 5, 5)).sample(), -3, 3) * displacement for _ in range(3)]
        self.z = axes[0][:, None, None] + disp[0]
        self.y = axes[1][None, :, None] + disp[1]
        self.x = axes[2][None, None, :] + disp[2]
        self.surface = [SmoothField(rng, shape, (6, 9, 9)).sample() for _ in range(2)]

    def box(self, lo: Tuple[float, float, float], hi: Tuple[float, float, float]) -> Tuple[slice, slice, slice]:
        """Index box covering normalised (z, y, x) bounds lo..hi plus the displacement margin."""
        out = []
        for a, l, h, n in zip(range(3), lo, hi, self.shape):
            o, s = self.origin[a], self.step[a]
            start = int(np.floor(o + (l - self.max_disp) / s))
            stop = int(np.ceil(o + (h + self.max_disp) / s)) + 1
            out.append(slice(min(max(start, 0), n), min(max(stop, 0), n)))
        return tuple(out)


def ellipsoid_level(grid: Grid, centre, radii, theta: float = 0.0, roughness: float = 0.0,
                    mix: Tuple[float, float] = (1.0, 0.0)) -> Tuple[Tuple[slice, slice, slice], np.ndarray]:
    """Level function of a perturbed ellipsoid in its bounding box: < 1 inside, < s**2 inside the copy scaled by s.

    centre and radii are normalised (z, y, x); theta rotates the ellipsoid about z (radians); roughness
    scales the surface noise (a mix of the grid's two surface fields, clipped to +-2.5 sd).
    Returns (box, level) with level float32 of the box's shape.
    """
    cz, cy, cx = centre
    rz, ry, rx = radii
    reach = max(ry, rx) * np.sqrt(1 + 2.5 * roughness * (abs(mix[0]) + abs(mix[1])))
    rzr = rz * np.sqrt(1 + 2.5 * roughness * (abs(mix[0]) + abs(mix[1])))
    box = grid.box((cz - rzr, cy - reach, cx - reach), (cz + rzr, cy + reach, cx + reach))
    dz, dy, dx = grid.z[box] - cz, grid.y[box] - cy, grid.x[box] - cx
    c, s = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    u, v = c * dx + s * dy, -s * dx + c * dy
    q = (u / rx) ** 2 + (v / ry) ** 2 + (dz / rz) ** 2
    if roughness:
        noise = mix[0] * grid.surface[0][box] + mix[1] * grid.surface[1][box]
        q = q / (1 + roughness * np.clip(noise, -2.5, 2.5))
    return box, q


def _jitter(rng: np.random.Generator, centre, radii, pos_sd: float = 0.03, scale: Tuple[float, float] = (0.88, 1.12)):
    centre = tuple(float(c + rng.normal(0, pos_sd)) for c in centre)
    radii = tuple(float(r * rng.uniform(*scale)) for r in radii)
    return centre, radii


def build_organ_map(grid: Grid, rng: np.random.Generator, habitus: Habitus = Habitus()) -> np.ndarray:
    """Paint the phantom's organs into a uint8 (z, y, x) map of ORGAN_LABELS values; later organs win overlaps."""
    L = ORGAN_LABELS
    om = np.zeros(grid.shape, np.uint8)
    ecc = rng.uniform(*habitus.eccentricity)            # body depth / width
    fat = rng.uniform(*habitus.fat)                     # subcutaneous fat thickness (normalised)
    wall = rng.uniform(0.05, 0.07)                      # abdominal muscle wall thickness
    body_r = 1 + 0.05 * grid.z + 0.025 * np.clip(grid.surface[0], -2.5, 2.5)
    ring = np.sqrt(grid.x ** 2 + (grid.y / ecc) ** 2) / body_r   # 1 at the skin
    om[ring < 1] = L["subcutaneous_fat"]
    om[ring < 1 - fat] = L["muscle"]
    cavity = ring < 1 - fat - wall
    om[cavity] = L["visceral_fat"]

    def paint(name, centre, radii, theta=0.0, roughness=0.1, inside=None, jitter=True, clip=True):
        if jitter:
            centre, radii = _jitter(rng, centre, radii)
            theta += rng.normal(0, 0.12)
        mix = tuple(rng.normal(0, 1, 2) / np.sqrt(2))
        box, q = ellipsoid_level(grid, centre, radii, theta, roughness, mix)
        m = q < 1 if inside is None else q < inside ** 2
        if clip:
            m &= cavity[box]
        om[box][m] = L[name]
        return box, q

    # bowel loops in the lower anterior abdomen, with gas collecting anteriorly (small y)
    for _ in range(int(rng.integers(7, 12))):
        c = (rng.uniform(-0.95, 0.2), rng.uniform(-0.5 * ecc, 0.1), rng.uniform(-0.6, 0.6))
        r = (rng.uniform(0.2, 0.35), rng.uniform(0.1, 0.16), rng.uniform(0.12, 0.2))
        box, q = paint("bowel", c, r, rng.uniform(0, np.pi), 0.15, jitter=False)
        gas = (q < 0.6) & (grid.y[box] < c[1] - 0.3 * r[1] * rng.uniform(0.3, 1.0)) & cavity[box]
        om[box][gas] = L["bowel_gas"]
    # kidneys (right one a little lower), cortex around a medulla/sinus core
    for side, dz in ((-1, -0.08), (1, 0.0)):
        c, r = (-0.2 + dz, 0.33 * ecc / 0.74, 0.33 * side), (0.3, 0.17, 0.13)
        c, r = _jitter(rng, c, r)
        th = side * 0.35 + rng.normal(0, 0.1)
        mix = tuple(rng.normal(0, 1, 2) / np.sqrt(2))
        box, q = ellipsoid_level(grid, c, r, th, 0.06, mix)
        m = (q < 1) & cavity[box]
        om[box][m] = L["kidney_cortex"]
        om[box][m & (q < rng.uniform(0.55, 0.7) ** 2)] = L["kidney_medulla"]
    # pancreas: head, body and tail along a curve in front of the aorta
    for c, r, th in (((-0.04, -0.05, -0.15), (0.16, 0.12, 0.14), 0.0), ((0.04, -0.01, 0.1), (0.12, 0.08, 0.19), 0.1),
                     ((0.1, 0.13, 0.36), (0.11, 0.075, 0.16), -0.5)):
        paint("pancreas", c, r, th, 0.08)
    paint("spleen", (0.35, 0.3 * ecc / 0.74, 0.55), (0.32, 0.3, 0.18), 0.55, 0.08)
    # liver: right lobe plus a left lobe crossing the midline anteriorly
    paint("liver", (0.3, -0.04, -0.42), (0.6, 0.48, 0.42), -0.25, 0.1)
    paint("liver", (0.38, -0.3 * ecc / 0.74, 0.0), (0.3, 0.17, 0.32), 0.1, 0.1)
    # lungs: ellipsoids centred above the field of view, so only the bases and domes show
    for side in (-1, 1):
        paint("lung", (1.3 + 0.05 * side, 0.1, 0.45 * side), (0.75, 0.55, 0.4), 0.0, 0.05)
    paint("aorta", (0.0, 0.14, 0.07), (4.0, 0.065, 0.065), 0.0, 0.0)
    for side in (-1, 1):   # paraspinal muscles
        paint("muscle", (0.0, 0.54 * ecc / 0.74, 0.19 * side), (4.0, 0.15, 0.12), 0.2 * side, 0.05, clip=False)
    _paint_spine(grid, om, rng, ecc)
    return om


def _paint_spine(grid: Grid, om: np.ndarray, rng: np.random.Generator, ecc: float) -> None:
    """Vertebral bodies (cancellous core, cortical shell) with discs every `period`, and spinous processes."""
    L = ORGAN_LABELS
    y0 = 0.34 * ecc / 0.74 + rng.normal(0, 0.02)
    body_r = rng.uniform(0.12, 0.15)
    box, q = ellipsoid_level(grid, (0.0, y0, 0.0), (4.0, body_r * 0.9, body_r))
    period, phase = rng.uniform(0.3, 0.4), rng.uniform(0, 1)
    disc = ((grid.z[box] / period + phase) % 1.0) < 0.17
    om[box][q < 1] = L["cortical_bone"]
    om[box][(q < 0.72 ** 2) & ~disc] = L["vertebra"]
    om[box][(q < 1) & disc] = L["disc"]
    box, q = ellipsoid_level(grid, (0.0, y0 + body_r + 0.13, 0.0), (4.0, 0.11, 0.035))
    om[box][(q < 1) & ~((grid.z[box] / period + phase + 0.5) % 1.0 < 0.3)] = L["cortical_bone"]


def organ_names_present(organ_map: np.ndarray) -> List[str]:
    """Names of the ORGAN_LABELS values that occur in organ_map (any shape)."""
    counts = np.bincount(organ_map.ravel(), minlength=max(ORGAN_LABELS.values()) + 1)
    return [n for n, v in ORGAN_LABELS.items() if counts[v] > 0]
