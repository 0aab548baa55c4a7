"""Gate calibration: score the tiles of cases the model did not train on, fit the gate's rule, record it.

Every sliding-window tile of every calibration case is scored by the Glance (`GFScreenNetwork.glance_logits`),
padded and cut exactly as the predictor does. Coverage (coverage.py) counts a lesion as covered when >= 90% of
its voxels lie in the central regions of selected tiles, the floor's tiles included. The threshold is the
operating_point.py rule: the highest whose *certified* lesion-level sensitivity reaches the target, or, when the
cases are too few to certify it, the highest covering every calibration lesion lowered by the
leave-one-case-out margin, said so in the record. The fallback envelope is the calibration cases' range of the
baseline tile logit (10th percentile), widened by that range and `fallback_tolerance` logits (`fit_envelope`).

`calibration_record` returns the one record of a calibration (JSON-ready): the rule, what it certifies (for
the whole rule and for the threshold alone, which is what the stock `nnUNetv2_predict` applies), the operating
point, the operating curve, the leave-one-case-out estimate of the deployed rule (each case gated by the rule
fitted on the others: the honest figure), and each case's coverage summary, from which `refit_rule` applies
the same rule to another target or selection budget. calibration_store.py keeps it in the checkpoint.
"""
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image

from nnunetv2_gfscreen.core.coverage import (CONNECTIVITY, MIN_COVERED_FRACTION, CaseCoverage, case_coverage,
                                             operating_curve, thin_curve)
from nnunetv2_gfscreen.core.gate import GateRule, top_share
from nnunetv2_gfscreen.core.network import GFScreenNetwork, autocast_on_cuda
from nnunetv2_gfscreen.core.operating_point import (DEFAULT_CONFIDENCE, certificate, describe_certificate,
                                                    fit_threshold, threshold_for_selection)
from nnunetv2_gfscreen.core.tiles import score_tile_logits, sliding_window_slicers

MAX_CURVE_POINTS = 2000
RECORD_VERSION = 2


@dataclass(frozen=True)
class CalibrationSettings:
    """How a gate is calibrated (defaults: plans/settings.py, the one place they are defined)."""
    target: float
    tile_margin: float
    floor: float
    fallback_tolerance: float
    confidence: float = DEFAULT_CONFIDENCE

    @classmethod
    def from_gfscreen(cls, settings) -> "CalibrationSettings":
        return cls(settings.target_lesion_sensitivity, settings.calibration_tile_margin, settings.gate_floor,
                   settings.gate_fallback_tolerance, settings.calibration_confidence)

    def to_dict(self) -> dict:
        return {"target_lesion_sensitivity": self.target, "tile_margin": self.tile_margin, "floor": self.floor,
                "fallback_tolerance": self.fallback_tolerance, "confidence": self.confidence,
                "min_covered_fraction": MIN_COVERED_FRACTION, "connectivity": CONNECTIVITY}


@dataclass
class ScoredCase:
    """One calibration case: its coverage under the whole rule (floor included) and under the threshold alone."""
    coverage: CaseCoverage
    threshold_only: CaseCoverage


def score_cases(network: GFScreenNetwork, cases: Iterable[Tuple[torch.Tensor, np.ndarray]],
                patch_size: Sequence[int], settings: CalibrationSettings, tile_step_size: float = 0.5,
                batch_size: int = 8, device: torch.device = torch.device('cpu'), voxel_volume: float = 1.0,
                case_ids: Optional[Sequence[str]] = None) -> List[ScoredCase]:
    """Score every tile of every case and summarise its lesion coverage.

    cases: (data (C, *shape), seg (1, *shape) or (*shape)) pairs in preprocessed space; seg > 0 is lesion.
    voxel_volume: mm^3 of a preprocessed voxel (lesion volumes for the size bins)."""
    if len(patch_size) != 3:
        raise NotImplementedError("calibration supports 3D configurations only")
    out: List[ScoredCase] = []
    amp = autocast_on_cuda(device)
    for data, seg in cases:
        case_id = None if case_ids is None else str(case_ids[len(out)])
        data = torch.as_tensor(np.asarray(data) if not isinstance(data, torch.Tensor) else data, dtype=torch.float32)
        seg = np.asarray(seg)
        seg = seg[None] if seg.ndim == 3 else seg
        if data.ndim != 4 or seg.shape[1:] != tuple(data.shape[1:]):
            raise ValueError(f"case {case_id or len(out)}: data must be (C, z, y, x) and seg (1, z, y, x) of the "
                             f"same spatial shape, got {tuple(data.shape)} and {seg.shape}")
        data = pad_nd_image(data, patch_size, 'constant', {'value': 0}, False, None)
        lesion = pad_nd_image(torch.from_numpy(seg > 0), patch_size, 'constant', {'value': False}, False, None)
        slicers = sliding_window_slicers(data.shape[1:], patch_size, tile_step_size)
        with amp:
            scores = score_tile_logits(network, data, slicers, batch_size, device)
        floor = top_share(scores, settings.floor).numpy()
        scores = scores.numpy()
        boxes = np.array([[[s.start, s.stop] for s in sl[1:]] for sl in slicers], dtype=np.int64)
        mask = lesion[0].numpy()
        kwargs = dict(tile_margin=settings.tile_margin, voxel_volume=voxel_volume, case_id=case_id)
        out.append(ScoredCase(case_coverage(mask, boxes, scores, floor=floor, **kwargs),
                              case_coverage(mask, boxes, scores, **kwargs)))
    if not out:
        raise ValueError("calibration needs at least one case")
    return out


def fit_envelope(cases: Sequence[CaseCoverage], tolerance: float) -> Optional[Tuple[float, float]]:
    """The range [lo, hi] of the cases' baseline tile logit (`gate.baseline_logit`), widened on each side by the
    range itself plus `tolerance` logits (None: no check, inf tolerance).

    A new case exchangeable with n calibration cases falls outside [lo, hi] with probability 2 / (n + 1): with
    the 4-16 cases of a fold that would send a third to a tenth of ordinary cases to the fallback. Widening by
    the observed spread and a tolerance keeps ordinary cases in and leaves the fallback to cases that sit far
    outside what calibration saw."""
    if not np.isfinite(tolerance):
        return None
    stats = [c.statistic for c in cases if len(c.tile_scores)]
    if not stats:
        return None
    lo, hi = min(stats), max(stats)
    width = (hi - lo) + tolerance
    return lo - width, hi + width


def fit_rule(cases: Sequence[CaseCoverage], settings: CalibrationSettings):
    """(GateRule, ThresholdFit) of calibration cases (the floor's tiles included in their coverage)."""
    fit = fit_threshold(cases, settings.target)
    rule = GateRule(threshold=fit.threshold, floor=settings.floor,
                    envelope=fit_envelope(cases, settings.fallback_tolerance), calibrated=True)
    return rule, fit


def _outside(rule: GateRule, case: CaseCoverage) -> bool:
    return rule.envelope is not None and len(case.tile_scores) > 0 and \
        not rule.envelope[0] <= case.statistic <= rule.envelope[1]


def leave_one_case_out(cases: Sequence[CaseCoverage], settings: CalibrationSettings, all_cases_rule: GateRule) -> dict:
    """Each case gated by the rule fitted on all *other* cases (the deployed procedure, margin and envelope
    included), and the pooled figures: the honest estimate of the deployed gate. A case whose other cases hold
    no lesion gets the all-cases rule ('fallback_rule': True). A case outside the others' envelope is predicted
    densely (the fallback selects every tile). JSON-ready; 'rules' maps case id -> rule dict."""
    rows, rules = [], {}
    for i, case in enumerate(cases):
        others = [c for j, c in enumerate(cases) if j != i]
        no_fit = not any(c.n_lesions for c in others)
        rule = all_cases_rule if no_fit else fit_rule(others, settings)[0]
        dense = _outside(rule, case)
        at = case.at(-np.inf if dense else rule.threshold)
        case_id = case.case_id or f"case_{i}"
        rules[case_id] = rule.to_dict()
        rows.append({"case": case_id, "threshold": rule.threshold, "fallback_rule": no_fit, "outside_envelope": dense,
                     **at})
    tiles, sel = sum(r["tiles"] for r in rows), sum(r["tiles_selected"] for r in rows)
    n_vox, n_les = sum(r["lesion_voxels"] for r in rows), sum(r["lesions"] for r in rows)
    covered = sum(r["lesions_covered"] for r in rows)
    return {"cases": rows, "rules": rules, "n_fallback_rule": sum(r["fallback_rule"] for r in rows),
            "n_outside_envelope": sum(r["outside_envelope"] for r in rows),
            "selection_ratio": sel / tiles if tiles else None,
            "voxel_coverage": sum(r["lesion_voxels_covered"] for r in rows) / n_vox if n_vox else None,
            "lesion_sensitivity": covered / n_les if n_les else None, "lesions": n_les, "lesions_covered": covered}


def calibration_record(scored: Sequence[ScoredCase], settings: CalibrationSettings, source: str,
                       patch_size: Sequence[int], tile_step_size: float,
                       max_curve_points: int = MAX_CURVE_POINTS) -> dict:
    """The calibration record (module docstring). Without lesions in the cases: an uncalibrated record."""
    cases = [s.coverage for s in scored]
    common = {"version": RECORD_VERSION, "source": source, "settings": settings.to_dict(),
              "patch_size": [int(p) for p in patch_size], "tile_step_size": float(tile_step_size),
              "n_cases": len(cases), "case_ids": [c.case_id for c in cases],
              "n_lesions": int(sum(c.n_lesions for c in cases)),
              "tiles_total": int(sum(len(c.tile_scores) for c in cases))}
    if not common["n_lesions"]:
        return uncalibrated_record(f"the {len(cases)} calibration case(s) hold no lesion", **common)
    rule, fit = fit_rule(cases, settings)
    point = {k: v[0] for k, v in operating_curve(cases, [rule.threshold]).items() if k != "threshold"}
    curve = operating_curve(cases)
    notes = [] if fit.target_certifiable else [fit.method]
    if len(cases) == 1:
        notes.append("one calibration case: no leave-one-case-out estimate (its rule is the all-cases one)")
    return {
        **common, "calibrated": True, "rule": rule.to_dict(),
        "fit": {"method": fit.method, "target_certifiable": fit.target_certifiable, "margin_logit": fit.margin,
                "threshold_in_sample": fit.in_sample},
        "certified": certificate(cases, rule.threshold, settings.target, settings.confidence),
        "certified_threshold_only": certificate([s.threshold_only for s in scored], rule.threshold, settings.target,
                                                settings.confidence),
        "point": point, "note": "; ".join(notes) or None,
        "loco": leave_one_case_out(cases, settings, rule),
        "curve_points": len(curve["threshold"]), "curve": thin_curve(curve, [rule.threshold], max_curve_points),
        "cases": [c.to_dict() for c in cases],
    }


def uncalibrated_record(reason: str, **fields) -> dict:
    """The record of a gate that was deliberately not calibrated (no held-out cases, no lesions): it keeps the
    uncalibrated rule (`gate.GateRule()`: p(select) > 0.5), and every report says so."""
    return {"version": RECORD_VERSION, **fields, "calibrated": False, "reason": reason, "rule": GateRule().to_dict()}


def refit_rule(record: dict, target: Optional[float] = None, max_selection: Optional[float] = None
               ) -> Tuple[GateRule, dict, str]:
    """The recorded calibration's rule for another lesion-level sensitivity target and/or a selection budget,
    by the same rule as the calibration (`fit_rule`): (rule, certificate at its threshold, what bound it).
    With both, the target's threshold is raised if needed until the selection ratio is <= max_selection."""
    if not record.get("calibrated"):
        raise ValueError(f"this model's gate is not calibrated ({record.get('reason')}); calibrate it first "
                         f"(nnUNetv2_gfscreen_calibrate)")
    if target is None and max_selection is None:
        raise ValueError("give a target sensitivity, a maximum selection ratio or both")
    cases = [CaseCoverage.from_dict(c) for c in record["cases"]]
    stored = record["settings"]
    settings = CalibrationSettings(stored["target_lesion_sensitivity"] if target is None else float(target),
                                   stored["tile_margin"], stored["floor"], stored["fallback_tolerance"],
                                   stored["confidence"])
    rule = GateRule.from_dict(record["rule"])
    bound = "lesion-level sensitivity target"
    if target is not None:
        fitted, fit = fit_rule(cases, settings)
        rule = rule.with_threshold(fitted.threshold)
        if not fit.target_certifiable:
            bound += f" ({fit.method})"
    if max_selection is not None:
        budget = threshold_for_selection(cases, max_selection)
        chosen = budget if target is None else max(budget, rule.threshold)  # the target's, raised to the budget
        if target is None or chosen != rule.threshold:
            rule, bound = rule.with_threshold(chosen), "selection budget"
    return rule, certificate(cases, rule.threshold, settings.target, settings.confidence), bound


def certificate_summary(record: dict) -> dict:
    """What a prediction's report says about the gate's calibration: calibrated or not (and why), how the threshold
    was fitted, and what the calibration cases certify (JSON-ready, small)."""
    if not record.get("calibrated"):
        return {"calibrated": False, "reason": record.get("reason")}
    cert = record["certified"]
    return {"calibrated": True, "source": record.get("source"), "method": record["fit"]["method"],
            "target": cert["target"], "target_certifiable": cert["target_certifiable"],
            "expected_sensitivity_certified": cert["expected_sensitivity_certified"],
            "lesion_sensitivity_lower_bound": cert["lesion_sensitivity_lower_bound"],
            "confidence": cert["confidence"], "calibration_lesions": cert["lesions"],
            "calibration_cases_with_lesions": cert["cases_with_lesions"],
            "loco_lesion_sensitivity": record["loco"]["lesion_sensitivity"]}


def describe_calibration(record: dict) -> str:
    """One paragraph for the log and the console."""
    if not record.get("calibrated"):
        return f"UNCALIBRATED gate (p(select) > 0.5): {record.get('reason')}"
    rule, point, loco = record["rule"], record["point"], record["loco"]
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    return (f"threshold logit {rule['threshold']:.6g} ({record['fit']['method']}), floor {rule['floor']}, envelope "
            f"{rule['envelope']}, on {record['n_cases']} case(s) from {record['source']}: selection ratio "
            f"{fmt(point['selection_ratio'])}; {describe_certificate(record['certified'])}. Stock nnUNetv2_predict "
            f"(threshold only): {record['certified_threshold_only']['lesions_covered']}/"
            f"{record['certified_threshold_only']['lesions']} lesions covered. Leave-one-case-out (each case at the "
            f"rule fitted on the others): selection ratio {fmt(loco['selection_ratio'])}, lesion-level "
            f"sensitivity {fmt(loco['lesion_sensitivity'])} ({loco['lesions_covered']}/{loco['lesions']}; "
            f"{loco['n_outside_envelope']} case(s) outside the envelope)" + (f". Note: {record['note']}"
                                                                              if record.get('note') else ""))


def preprocessed_cases(dataset, keys: Sequence[str]):
    for k in keys:
        data, seg, _, _ = dataset.load_case(k)
        yield torch.from_numpy(np.asarray(data[:], dtype=np.float32)), np.asarray(seg[:])
