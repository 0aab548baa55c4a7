"""GF-Screen settings: defaults from docs/method.md (sections 3, 10), overridable per configuration in the plans file.

A configuration's `gfscreen` block (e.g. in `3d_fullres_gfscreen`, which inherits from `3d_fullres`)
overrides any of the fields below; unknown keys are refused so a typo never silently falls back
to a default.
"""
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional

PLANS_KEY = "gfscreen"
# keys that no longer exist, with what replaced them
RENAMED = {"target_tile_sensitivity": "target_lesion_sensitivity",
           "threshold": "nothing: an uncalibrated gate selects tiles with p(select) > 0.5 until calibration sets its "
                        "rule"}


@dataclass(frozen=True)
class GFScreenSettings:
    group_size: int = 16  # N sub-volumes per CT; the paper found N=4 much worse than 16
    groups_per_step: int = 2  # CTs (groups) per training step: one CT's tiles give strongly correlated gradients
    lesion_share: float = 0.33  # share of each group drawn from the grid tiles that hold lesion
    lesion_slots_per_lesion: int = 1  # 1: a lesion slot draws a lesion, then its tile; 0: a lesion tile (voxel-led)
    tile_step_size: float = 0.5  # groups are cut on the predictor's sliding-window grid with this step
    alpha: float = 0.1  # weight of the class-balanced CE term
    beta: float = 0.01  # weight of the KL(pi || pi_ref) term
    clip_eps: float = 0.1  # PPO-style ratio clip
    dual_clip: float = 3.0  # cap on the ratio for negative advantages (dual-clip PPO); 0 turns it off
    glance_input_scale: float = 0.5  # the Glance reads the tile downsampled by this factor per axis
    glance_base_features: int = 16  # the Glance's width: stages of 1, 2, 4, 8, 16 x this (16: ResNet-18)
    glance_lr: float = 3e-4  # AdamW, as in the paper, with cosine decay over the training
    glance_weight_decay: float = 1e-2
    glance_dense_weight: float = 1.0  # weight of the Glance's dense lesion-map loss (0: tile-level only)
    glance_logit_bound: float = 0.0  # soft bound c * tanh(z / c) on the select logit (shapes the network); 0: off
    glance_label_smoothing: float = 0.05  # targets y (1 - e) + e / 2 in the dense loss and GRL's CE term; 0: off
    glance_dense_per_lesion: int = 1  # 1: every lesion in a tile weighs the same in the dense loss; 0: every map voxel
    glance_dense_stage: int = 1  # encoder stage whose output the dense head reads (0 is finer, for small lesions)
    glance_ema_decay: float = 0.99  # EMA of the Glance's weights, used for validation, calibration, inference
    glance_aug_p: float = 0.5  # probability per tile of intensity augmentation of the Glance's input
    # calibration target for the gate threshold: share of lesions with >= 90% of their voxels in selected tiles
    target_lesion_sensitivity: float = 0.98
    # coverage counted by the tiles' central regions: this fraction of each side is ignored at inner faces
    calibration_tile_margin: float = 0.25
    calibration_confidence: float = 0.95  # confidence of the Clopper-Pearson bound the calibration reports
    gate_floor: float = 0.02  # share of each case's tiles always selected, by Glance rank (shift-robust)
    # a case whose baseline tile logit (10th percentile) lies outside the calibration cases' range, widened by that
    # range plus this many logits, is gated densely (the fallback); inf turns it off
    gate_fallback_tolerance: float = 5.0
    gate_border_growth: int = 1  # 1: predict the tiles beyond a lesion cut by the selection's border

    def __post_init__(self):
        checks = {
            "group_size": self.group_size >= 2,
            "groups_per_step": self.groups_per_step >= 1,
            "tile_step_size": 0 < self.tile_step_size <= 1,
            "lesion_share": 0.0 <= self.lesion_share <= 1.0,
            "lesion_slots_per_lesion": self.lesion_slots_per_lesion in (0, 1),
            "alpha": self.alpha >= 0,
            "beta": self.beta >= 0,
            "clip_eps": 0 < self.clip_eps < 1,
            "dual_clip": self.dual_clip == 0 or self.dual_clip > 1,
            "glance_input_scale": 0 < self.glance_input_scale <= 1,
            "glance_base_features": self.glance_base_features >= 1,
            "glance_dense_weight": self.glance_dense_weight >= 0,
            "glance_logit_bound": self.glance_logit_bound >= 0,
            "glance_label_smoothing": 0 <= self.glance_label_smoothing < 1,
            "glance_dense_per_lesion": self.glance_dense_per_lesion in (0, 1),
            "glance_dense_stage": 0 <= self.glance_dense_stage <= 4,
            "glance_ema_decay": 0 <= self.glance_ema_decay < 1,
            "glance_aug_p": 0 <= self.glance_aug_p <= 1,
            "glance_lr": self.glance_lr > 0,
            "glance_weight_decay": self.glance_weight_decay >= 0,
            "target_lesion_sensitivity": 0 < self.target_lesion_sensitivity <= 1,
            "calibration_tile_margin": 0 <= self.calibration_tile_margin < 0.5,
            "calibration_confidence": 0 < self.calibration_confidence < 1,
            "gate_floor": 0 <= self.gate_floor <= 1,
            "gate_fallback_tolerance": self.gate_fallback_tolerance >= 0,
            "gate_border_growth": self.gate_border_growth in (0, 1),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid GF-Screen settings: {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)} "
                             f"(group_size >= 2 since a group of one has no relative advantage; shares and "
                             f"probabilities in [0, 1]; switches 0 or 1; clip_eps in (0, 1); dual_clip 0 or > 1; scale in (0, 1])")

    @classmethod
    def from_dict(cls, overrides: Optional[Mapping[str, Any]]) -> "GFScreenSettings":
        """Defaults updated with `overrides`; values are cast to the field's type."""
        overrides = dict(overrides or {})
        renamed = sorted(set(overrides) & set(RENAMED))
        if renamed:
            raise ValueError(f"GF-Screen setting(s) {renamed} no longer exist; instead: "
                             f"{[RENAMED[k] for k in renamed]} (in an existing plans file edit the configuration's "
                             f"gfscreen block)")
        allowed = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(overrides) - set(allowed))
        if unknown:
            raise ValueError(f"unknown GF-Screen setting(s) {unknown}; allowed: {sorted(allowed)}")
        cast = {}
        for k, v in overrides.items():
            typ = int if allowed[k] in (int, "int") else float
            try:
                cast[k] = typ(v)
            except (TypeError, ValueError):
                raise ValueError(f"GF-Screen setting {k}={v!r} is not a valid {typ.__name__}") from None
            if typ is int and cast[k] != float(v):
                raise ValueError(f"GF-Screen setting {k}={v!r} must be an integer")
        return cls(**cast)

    @classmethod
    def from_configuration(cls, configuration: Mapping[str, Any]) -> "GFScreenSettings":
        """Settings of an nnU-Net configuration dict (`ConfigurationManager.configuration`).

        Used to rebuild the network (training and inference). A plans file written before a key was renamed
        (RENAMED) still loads: the old key only steered calibration, which inference does not need, so it is
        dropped with a warning here; training reads the block with `from_dict` and refuses it.
        """
        block = dict(configuration.get(PLANS_KEY) or {})
        for old in sorted(set(block) & set(RENAMED)):
            warnings.warn(f"GF-Screen plans setting {old!r} is obsolete and ignored (now {RENAMED[old]!r})")
            del block[old]
        return cls.from_dict(block)

    def to_dict(self) -> dict:
        return asdict(self)
