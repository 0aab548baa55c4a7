"""The screening figures the demo and the method benchmark print for a model on held-out test sets.

Per test set: dense and gated lesion-level sensitivity, DSC and false positives per case, the gate's selection
ratio and lesion coverage next to a random gate at the same tiles per case, the same per lesion-size bin, and
what the gate's case-level parts did (fallback cases, tiles the floor and border growth added); the issue's
targets as met / MISSED; and the calibration's certified level. Pure: everything comes from the runner's
evaluation aggregates and gate figures (`Runner.predict_and_evaluate`) and the calibration record.

A set is first reduced to additive counts (`set_counts`), so several sets pool by summing (`pool_counts`) and
every rate is computed once, from counts (`rates`).
"""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from nnunetv2_gfscreen.core.lesions import SIZE_BIN_KEYS, SIZE_BINS

MIN_BIN_LESIONS = 5      # a size bin is held to the target when it has at least this many lesions
_EPS = 1e-12             # rates compared from counts: no float noise may flip a target

_SUMMED = ("cases", "lesions", "dense_found", "gated_found", "dense_dsc_sum", "gated_dsc_sum", "dense_fp", "gated_fp",
           "tiles", "tiles_selected", "coverage_lesions", "covered", "random_covered", "decision_cases",
           "fallback_cases", "tiles_by_floor", "tiles_by_fallback", "tiles_grown")
_BIN_SUMMED = ("lesions", "dense_found", "gated_found", "coverage_lesions", "covered", "random_covered")


def set_counts(runs: Dict[str, dict]) -> dict:
    """Additive counts of one test set from `Runner.predict_and_evaluate`'s runs (dense and gated evaluation
    aggregates with per-bin detection; the gated run's gate figures with its decisions)."""
    dense, gated = runs["dense"], runs["gated"]
    gate = gated["gate"]
    decisions = gate.get("decisions") or {}
    n = int(dense["n_cases"])
    bins = []
    for b, (name, key) in enumerate(zip(SIZE_BINS, SIZE_BIN_KEYS)):
        d, g, c = dense["size_bins"][b], gated["size_bins"][b], gate["size_bins"][b]
        bins.append({"bin": name, "key": key, "lesions": d["lesions"], "dense_found": d["found"],
                     "gated_found": g["found"], "coverage_lesions": c["lesions"], "covered": c["covered"],
                     "random_covered": (c["random_coverage"] or 0.0) * c["lesions"]})
    return {"cases": n, "lesions": int(dense["n_lesions"]), "dense_found": int(dense["n_found"]),
            "gated_found": int(gated["n_found"]), "dense_dsc_sum": float(dense["dsc_mean"]) * n,
            "gated_dsc_sum": float(gated["dsc_mean"]) * n, "dense_fp": int(dense["n_fp_components"]),
            "gated_fp": int(gated["n_fp_components"]), "tiles": int(gate["tiles"]),
            "tiles_selected": int(gate["tiles_selected"]), "coverage_lesions": int(gate["lesions"]),
            "covered": int(gate["lesions_covered"]),
            "random_covered": (gate["random_lesion_coverage"] or 0.0) * gate["lesions"],
            "decision_cases": int(decisions.get("cases", 0)), "fallback_cases": int(decisions.get("fallback_cases", 0)),
            "tiles_by_floor": int(decisions.get("tiles_by_floor", 0)),
            "tiles_by_fallback": int(decisions.get("tiles_by_fallback", 0)),
            "tiles_grown": int(decisions.get("tiles_grown", 0)), "size_bins": bins}


def pool_counts(counts: Sequence[dict]) -> dict:
    """The counts of several sets together (sums, also per size bin)."""
    if not counts:
        raise ValueError("need at least one set to pool")
    out = {k: sum(c[k] for c in counts) for k in _SUMMED}
    out["size_bins"] = [{"bin": bins[0]["bin"], "key": bins[0]["key"],
                         **{k: sum(b[k] for b in bins) for k in _BIN_SUMMED}}
                        for bins in zip(*(c["size_bins"] for c in counts))]
    return out


def _ratio(num: float, den: float) -> Optional[float]:
    return num / den if den else None


def rates(c: dict) -> dict:
    """The figures of a set (or pooled sets) from its counts; None where there is nothing to count over."""
    return {
        "cases": c["cases"], "lesions": c["lesions"],
        "dense_sensitivity": _ratio(c["dense_found"], c["lesions"]),
        "gated_sensitivity": _ratio(c["gated_found"], c["lesions"]),
        "dense_dsc": _ratio(c["dense_dsc_sum"], c["cases"]), "gated_dsc": _ratio(c["gated_dsc_sum"], c["cases"]),
        "dense_fp_per_case": _ratio(c["dense_fp"], c["cases"]), "gated_fp_per_case": _ratio(c["gated_fp"], c["cases"]),
        "selection_ratio": _ratio(c["tiles_selected"], c["tiles"]),
        "lesion_coverage": _ratio(c["covered"], c["coverage_lesions"]),
        "random_lesion_coverage": _ratio(c["random_covered"], c["coverage_lesions"]),
        "fallback_rate": _ratio(c["fallback_cases"], c["decision_cases"]), "fallback_cases": c["fallback_cases"],
        "tiles_by_floor": c["tiles_by_floor"], "tiles_by_fallback": c["tiles_by_fallback"],
        "tiles_grown": c["tiles_grown"],
        "size_bins": [{"bin": b["bin"], "key": b["key"], "lesions": b["lesions"],
                       "dense_sensitivity": _ratio(b["dense_found"], b["lesions"]),
                       "gated_sensitivity": _ratio(b["gated_found"], b["lesions"]),
                       "lesion_coverage": _ratio(b["covered"], b["coverage_lesions"]),
                       "random_lesion_coverage": _ratio(b["random_covered"], b["coverage_lesions"])}
                      for b in c["size_bins"]],
    }


# ---------------------------------------------------------------------- targets (issue: a gate that loses no lesion)
def _pts(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def _at_least(a: Optional[float], b: Optional[float], slack: float) -> Optional[bool]:
    return None if a is None or b is None else a >= b - slack - _EPS


def _bins_hold(r: dict, slack: float) -> Tuple[Optional[bool], str]:
    held = [b for b in r["size_bins"] if b["lesions"] >= MIN_BIN_LESIONS]
    if not held:
        return None, f"no bin with >= {MIN_BIN_LESIONS} lesions"
    checks = [_at_least(b["gated_sensitivity"], b["dense_sensitivity"], slack) for b in held]
    text = ", ".join(f"{b['bin']}: {_pts(b['gated_sensitivity'])} vs {_pts(b['dense_sensitivity'])}" for b in held)
    return all(checks), text


Target = Tuple[str, Callable[[dict], Tuple[Optional[bool], str]]]
UNSHIFTED_TARGETS: Tuple[Target, ...] = (
    ("selection ratio <= 15%", lambda r: (None if r["selection_ratio"] is None else
                                          r["selection_ratio"] <= 0.15 + _EPS, f"{_pts(r['selection_ratio'])}%")),
    ("gated lesion-level sensitivity >= dense - 2 points",
     lambda r: (_at_least(r["gated_sensitivity"], r["dense_sensitivity"], 0.02),
                f"{_pts(r['gated_sensitivity'])} vs {_pts(r['dense_sensitivity'])}")),
    (f"... and in every size bin with >= {MIN_BIN_LESIONS} lesions", lambda r: _bins_hold(r, 0.02)),
    ("gated DSC >= dense - 1 point", lambda r: (_at_least(r["gated_dsc"], r["dense_dsc"], 0.01),
                                                f"{_pts(r['gated_dsc'])} vs {_pts(r['dense_dsc'])}")),
    ("gated FP per case <= dense", lambda r: (_at_least(r["dense_fp_per_case"], r["gated_fp_per_case"], 0.0),
                                              f"{r['gated_fp_per_case']:.2f} vs {r['dense_fp_per_case']:.2f}")),
)
SHIFTED_TARGETS: Tuple[Target, ...] = (
    ("shifted: gated lesion-level sensitivity >= dense - 5 points",
     lambda r: (_at_least(r["gated_sensitivity"], r["dense_sensitivity"], 0.05),
                f"{_pts(r['gated_sensitivity'])} vs {_pts(r['dense_sensitivity'])}; fallback "
                f"{r['fallback_cases']} case(s)")),
)


def check_targets(r: dict, shifted: bool) -> Dict[str, dict]:
    """{target: {"met": True / False / None (nothing to judge), "value": what was measured}} for a set's rates."""
    return {name: dict(zip(("met", "value"), check(r))) for name, check in
            (SHIFTED_TARGETS if shifted else UNSHIFTED_TARGETS)}


def verdict(met: Optional[bool]) -> str:
    return "n/a" if met is None else ("met" if met else "MISSED")


# ---------------------------------------------------------------------- tables
def _num(v: Optional[float], digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def sets_table(rows: Sequence[Tuple[str, dict]]) -> str:
    """Markdown, one row per (label, rates): dense vs gated detection, DSC and false positives; the gate's selection
    and lesion coverage next to a random gate at the same tiles per case; what the case-level parts added."""
    lines = ["| test set | cases | lesions | lesion sens. dense % | lesion sens. gated % | DSC dense % | DSC gated % | "
             "FP/case dense | FP/case gated | selection % | lesions covered % | random gate covered % | "
             "fallback cases | tiles by floor | tiles grown |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in rows:
        lines.append(f"| {label} | {r['cases']} | {r['lesions']} | {_pts(r['dense_sensitivity'])} | "
                     f"{_pts(r['gated_sensitivity'])} | {_pts(r['dense_dsc'])} | {_pts(r['gated_dsc'])} | "
                     f"{_num(r['dense_fp_per_case'])} | {_num(r['gated_fp_per_case'])} | "
                     f"{_pts(r['selection_ratio'])} | "
                     f"{_pts(r['lesion_coverage'])} | {_pts(r['random_lesion_coverage'])} | {r['fallback_cases']} | "
                     f"{r['tiles_by_floor']} | {r['tiles_grown']} |")
    return "\n".join(lines) + "\n"


def size_table(rows: Sequence[Tuple[str, dict]]) -> str:
    """Markdown, per (label, rates) and lesion-volume bin: lesion-level sensitivity dense and gated, the lesions
    the gate's tiles cover, and a random gate's at the same tiles per case."""
    lines = ["| test set | lesion volume | lesions | lesion sens. dense % | lesion sens. gated % | "
             "lesions covered by the gate % | random gate covered % |", "|---|---|---|---|---|---|---|"]
    for label, r in rows:
        for b in r["size_bins"]:
            lines.append(f"| {label} | {b['bin']} | {b['lesions']} | {_pts(b['dense_sensitivity'])} | "
                         f"{_pts(b['gated_sensitivity'])} | {_pts(b['lesion_coverage'])} | "
                         f"{_pts(b['random_lesion_coverage'])} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- the calibration's promise
def calibration_summary(record: dict) -> dict:
    """What a calibration record (core/calibration.py) promises, JSON-ready: the rule, how its threshold was
    fitted, the certified level (whole rule, and the threshold alone), the leave-one-case-out figures, the note."""
    if not record:
        return {"calibrated": None, "reason": "the checkpoint holds no calibration record"}
    if "version" not in record and "threshold" in record:
        return {"calibrated": True, "reason": "a calibration record of an older format (no certified level)",
                "threshold": record.get("threshold")}
    if not record.get("calibrated"):
        return {"calibrated": False, "reason": record.get("reason")}
    cert_keys = ("threshold", "target", "confidence", "cases_with_lesions", "lesions", "lesions_covered",
                 "lesion_sensitivity", "expected_sensitivity_certified", "lesion_sensitivity_lower_bound",
                 "target_certifiable", "cases_needed_for_target", "size_bins")
    loco = record.get("loco") or {}
    return {"calibrated": True, "rule": record.get("rule"), "n_cases": record.get("n_cases"),
            "source": record.get("source"), "method": (record.get("fit") or {}).get("method"),
            "note": record.get("note"),
            "certified": {k: record["certified"].get(k) for k in cert_keys},
            "certified_threshold_only": {k: (record.get("certified_threshold_only") or {}).get(k) for k in cert_keys},
            "loco": {k: loco.get(k) for k in ("selection_ratio", "voxel_coverage", "lesion_sensitivity", "lesions",
                                              "lesions_covered", "n_outside_envelope", "n_fallback_rule")}}


def calibration_lines(summary: dict) -> List[str]:
    """`calibration_summary` as sentences a user can read."""
    if not summary.get("calibrated"):
        state = "no calibration" if summary.get("calibrated") is None else "UNCALIBRATED gate (p(select) > 0.5)"
        return [f"Calibration: {state}: {summary.get('reason')}."]
    if "certified" not in summary:
        return [f"Calibration: {summary['reason']}; threshold {summary.get('threshold')}."]
    from nnunetv2_gfscreen.core.operating_point import describe_certificate
    rule, only, loco = summary["rule"] or {}, summary["certified_threshold_only"], summary["loco"]
    lines = [f"Calibration on {summary['n_cases']} case(s) ({summary['source']}): threshold logit "
             f"{rule.get('threshold', float('nan')):.4g}, floor {rule.get('floor')}, envelope {rule.get('envelope')}; "
             f"threshold fitted as: {summary['method']}.",
             f"Certified (whole rule): {describe_certificate(summary['certified'])}.",
             f"Threshold alone (stock nnUNetv2_predict): {only['lesions_covered']}/{only['lesions']} calibration "
             f"lesions covered, lesion-level sensitivity >= {_pts(only['lesion_sensitivity_lower_bound'])}% at "
             f"{100 * (only['confidence'] or 0):.0f}% confidence.",
             f"Leave-one-case-out (each calibration case gated by the rule fitted on the others): selection ratio "
             f"{_pts(loco['selection_ratio'])}%, lesion-level coverage {_pts(loco['lesion_sensitivity'])}% "
             f"({loco['lesions_covered']}/{loco['lesions']}), {loco['n_outside_envelope']} case(s) outside the "
             f"envelope."]
    if summary.get("note"):
        lines.append(f"Calibration note: {summary['note']}.")
    return lines
