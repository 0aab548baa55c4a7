"""The gate's operating point: which threshold the calibration cases support, and what they certify.

The promise of a screening gate is lesion-level sensitivity on cases it has never seen, and a handful of
calibration lesions cannot back a promise of 98% (docs/method.md, section 6). So the threshold comes with
what the calibration certifies, computed from counts:

- **Conformal risk control** (Angelopoulos et al., ICLR 2024) over cases: the loss of a case is the share of
  its lesions the gate misses (in [0, 1]); with n calibration cases that hold lesions and R(t) their mean
  loss at threshold t, a new case exchangeable with them has expected loss <= (n R(t) + 1) / (n + 1). So
  `certified_sensitivity(t) = 1 - (n R(t) + 1) / (n + 1)` is the expected lesion-level sensitivity on a new
  case that the calibration guarantees. Counting per case respects that lesions of one case are not
  independent. It can never exceed n / (n + 1): a 0.98 target needs at least 49 calibration cases with
  lesions (`cases_needed`).
- **Clopper-Pearson** one-sided lower bound on lesion-level sensitivity from k of m lesions covered, at a
  stated confidence (treats the lesions as independent draws; m lesions all covered certify (1 - conf)^(1/m)).

The rule (`fit_threshold`): the highest threshold whose certified sensitivity reaches the target. When the
calibration cases are too few for the target, no threshold can be certified at it; the rule then says so and
is conservative: the highest threshold that covers every calibration lesion (the most the cases can
certify), lowered by the leave-one-case-out margin (`loco_margin`), the logit distance by which that rule
missed held-out calibration lesions. Every path applies this one rule (training's calibration,
`nnUNetv2_gfscreen_calibrate`, `--target_sensitivity`, the final validation's per-case rules), from the
cases' coverage summaries (`coverage.CaseCoverage`), which the calibration record keeps.
"""
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
from scipy.stats import beta

from nnunetv2_gfscreen.core.coverage import CaseCoverage, candidate_thresholds, coverage_rank
from nnunetv2_gfscreen.core.lesions import SIZE_BIN_KEYS, SIZE_BINS, size_bin

DEFAULT_CONFIDENCE = 0.95


# ---------------------------------------------------------------------- certificates (pure, from counts)
def clopper_pearson_lower(k: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> Optional[float]:
    """One-sided Clopper-Pearson lower bound on a proportion from k successes in n trials (None if n == 0)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return None
    return 0.0 if k == 0 else float(beta.ppf(1 - confidence, k, n - k + 1))


def crc_certified(mean_loss: float, n: int) -> float:
    """1 - (n * mean_loss + 1) / (n + 1): the expected sensitivity conformal risk control certifies for a new
    case from n calibration cases with mean loss (share of lesions missed) `mean_loss`."""
    if n < 1:
        raise ValueError(f"need at least one calibration case with lesions, got {n}")
    return 1.0 - (n * float(mean_loss) + 1.0) / (n + 1.0)


def cases_needed(target: float) -> int:
    """Calibration cases with lesions needed before conformal risk control can certify `target` at all."""
    if not 0 < target < 1:
        raise ValueError(f"target must be in (0, 1), got {target}")
    return max(1, math.ceil(target / (1.0 - target) - 1e-9))


# ---------------------------------------------------------------------- the rule
@dataclass
class ThresholdFit:
    threshold: float            # logit
    method: str                 # "certified" | "not certifiable: every calibration lesion, lowered by a margin" | ...
    target_certifiable: bool
    margin: Optional[float]     # logits subtracted (leave-one-case-out), if any
    in_sample: float            # the threshold before the margin


def _lesion_cases(cases: Sequence[CaseCoverage]) -> List[CaseCoverage]:
    return [c for c in cases if c.n_lesions]


def mean_miss(cases: Sequence[CaseCoverage], threshold: float) -> float:
    """Mean over cases with lesions of the share of their lesions missed at `threshold` (covered iff t < score)."""
    with_lesions = _lesion_cases(cases)
    return float(np.mean([(c.lesion_scores <= threshold).mean() for c in with_lesions]))


def _just_below(value: float, scores: np.ndarray) -> float:
    """The highest candidate threshold (midpoints between tile scores) strictly below `value`."""
    candidates = candidate_thresholds(scores)
    below = candidates[candidates < value]
    if len(below):
        return float(below[-1])
    return float(np.nextafter(value, -np.inf)) if np.isfinite(value) else float(candidates[0])


def _highest_within(cases: Sequence[CaseCoverage], max_loss: float) -> float:
    """The highest threshold at which the mean case loss stays <= max_loss."""
    with_lesions = _lesion_cases(cases)
    n = len(with_lesions)
    scores = np.concatenate([c.tile_scores for c in cases])
    # the loss steps up at each lesion score s (a lesion is missed once t >= s) by 1 / (n * lesions of its case)
    lesion_scores = np.concatenate([c.lesion_scores for c in with_lesions])
    weights = np.concatenate([np.full(c.n_lesions, 1.0 / (n * c.n_lesions)) for c in with_lesions])
    order = np.argsort(lesion_scores, kind="stable")
    lesion_scores, cumulative = lesion_scores[order], np.cumsum(weights[order])
    over = np.flatnonzero(cumulative > max_loss + 1e-12)
    if not len(over):
        return float(np.inf) if not len(scores) else float(np.max(scores))  # nothing to miss: select by floor only
    first = over[0]
    # every lesion with this score goes at once: stay below the lowest score whose misses break the budget
    return _just_below(lesion_scores[first], scores)


def _all_covered(cases: Sequence[CaseCoverage]) -> float:
    return _highest_within(cases, 0.0)


def loco_margin(cases: Sequence[CaseCoverage], target: float) -> Optional[float]:
    """The smallest margin m >= 0 (logits) such that lowering each case's leave-one-case-out "every lesion
    covered" threshold by m covers `target` of the held-out lesions (pooled). None when no case with lesions
    has another case with lesions to fit on.

    Why: the highest threshold that covers a few calibration lesions sits right at the weakest one's score,
    and a confident Glance spreads lesion scores over tens of logits, so a new lesion is easily missed; the
    margin that would have rescued the held-out calibration lesions estimates how far to go below it."""
    gaps = []
    for i, case in enumerate(cases):
        others = [c for j, c in enumerate(cases) if j != i]
        if not case.n_lesions or not _lesion_cases(others):
            continue
        t = _all_covered(others)
        gaps.append(t - case.lesion_scores)  # missed by t - score when positive
    if not gaps:
        return None
    gaps = np.sort(np.concatenate(gaps))
    need = gaps[int(coverage_rank(np.array([len(gaps)]), target)[0]) - 1]
    return 0.0 if not np.isfinite(need) or need < 0 else float(need + 1e-6)


def fit_threshold(cases: Sequence[CaseCoverage], target: float) -> ThresholdFit:
    """The gate's threshold rule (module docstring). ValueError without lesions."""
    if not 0 < target <= 1:
        raise ValueError(f"target lesion-level sensitivity must be in (0, 1], got {target}")
    n = len(_lesion_cases(cases))
    if not n:
        raise ValueError("the calibration cases hold no lesion: nothing to calibrate the gate on")
    if target < 1 and n >= cases_needed(target):
        max_loss = ((n + 1) * (1 - target) - 1) / n
        t = _highest_within(cases, max_loss)
        return ThresholdFit(t, "certified", True, None, t)
    in_sample = _all_covered(cases)
    margin = loco_margin(cases, target)
    t = in_sample - margin if margin else in_sample
    method = "not certifiable with these cases: every calibration lesion covered" + \
        (f", lowered by the leave-one-case-out margin ({margin:.3g} logits)" if margin else "")
    return ThresholdFit(float(t), method, False, margin, in_sample)


def threshold_for_selection(cases: Sequence[CaseCoverage], max_selection: float) -> float:
    """The lowest threshold whose pooled selection ratio (floor included) is <= max_selection."""
    if not 0 <= max_selection <= 1:
        raise ValueError(f"max_selection must be in [0, 1], got {max_selection}")
    selection = np.sort(np.concatenate([c.selection_scores for c in cases]))
    scores = np.concatenate([c.tile_scores for c in cases])
    for t in candidate_thresholds(scores):
        if (len(selection) - np.searchsorted(selection, t, side="right")) <= max_selection * len(selection) + 1e-9:
            return float(t)
    return float(candidate_thresholds(scores)[-1])


# ---------------------------------------------------------------------- what a threshold certifies
def certificate(cases: Sequence[CaseCoverage], threshold: float, target: float,
                confidence: float = DEFAULT_CONFIDENCE) -> dict:
    """What the calibration cases certify at `threshold` (JSON-ready): the point estimate, the conformal
    expected sensitivity, the Clopper-Pearson lower bound, and the same per lesion-size bin."""
    with_lesions = _lesion_cases(cases)
    n = len(with_lesions)
    scores = np.concatenate([c.lesion_scores for c in cases]) if cases else np.zeros(0)
    volumes = np.concatenate([c.lesion_volumes for c in cases]) if cases else np.zeros(0)
    covered = scores > threshold
    bins = size_bin(volumes)
    per_bin = []
    for b, (name, key) in enumerate(zip(SIZE_BINS, SIZE_BIN_KEYS)):
        m, k = int((bins == b).sum()), int(covered[bins == b].sum())
        per_bin.append({"bin": name, "key": key, "lesions": m, "covered": k,
                        "sensitivity": k / m if m else None,
                        "lower_bound": clopper_pearson_lower(k, m, confidence)})
    m, k = len(scores), int(covered.sum())
    return {
        "threshold": float(threshold), "target": float(target), "confidence": float(confidence),
        "cases_with_lesions": n, "lesions": m, "lesions_covered": k,
        "lesion_sensitivity": k / m if m else None,
        "expected_sensitivity_certified": crc_certified(mean_miss(cases, threshold), n) if n else None,
        "lesion_sensitivity_lower_bound": clopper_pearson_lower(k, m, confidence),
        "target_certifiable": bool(target < 1 and n >= cases_needed(target)) if n else False,
        "cases_needed_for_target": cases_needed(target) if target < 1 else None,
        "size_bins": per_bin,
    }


def describe_certificate(cert: dict) -> str:
    """One sentence a user can read: what was certified, and what was not."""
    fmt = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    bins = ", ".join(f"{b['bin']}: {b['covered']}/{b['lesions']}" for b in cert["size_bins"] if b["lesions"])
    text = (f"{cert['lesions_covered']}/{cert['lesions']} calibration lesions covered ({fmt(cert['lesion_sensitivity'])}"
            f"; by size {bins or 'n/a'}); certified: expected lesion-level sensitivity >= "
            f"{fmt(cert['expected_sensitivity_certified'])} on a new case like the {cert['cases_with_lesions']} "
            f"calibration case(s) with lesions (conformal risk control), lesion-level sensitivity >= "
            f"{fmt(cert['lesion_sensitivity_lower_bound'])} at {100 * cert['confidence']:.0f}% confidence "
            f"(Clopper-Pearson)")
    if not cert["target_certifiable"] and cert["cases_needed_for_target"]:
        text += (f". The target {fmt(cert['target'])} cannot be certified with "
                 f"{cert['cases_with_lesions']} case(s) with lesions: it needs at least "
                 f"{cert['cases_needed_for_target']}")
    return text
