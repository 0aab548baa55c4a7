"""The gate: which sliding-window tiles of a case the Focus sees. One decision, used by every path.

A tile's score is the Glance's select *logit* (float64; `GFScreenNetwork.glance_logits`, one Glance pass per
tile). Logits, not probabilities: a trained Glance is confident, and probabilities near 1 cannot be told
apart in floating point where calibrated thresholds land. The decision for a case (`decide`) is the union of

1. the **threshold**: tiles whose logit > `rule.threshold` (`select_tiles`, a pure per-tile test; the stock
   `nnUNetv2_predict` path hands the network one tile at a time and can apply only this part);
2. the **floor**: the case's top `rule.floor` share of tiles by logit, whatever their logits. A rank does not
   move when a scanner shifts all of a case's scores, so the floor keeps the tiles the Glance finds most
   suspicious even where a shift has pushed every lesion below the threshold;
3. the **fallback**: when the case's baseline, the 10th percentile of its tile logits (where its healthiest
   tiles sit, which lesions do not move), lies outside `rule.envelope` (the range seen on the calibration cases,
   widened), the Glance is looking at a kind of CT it was not calibrated on; then the top
   `rule.fallback_selection` share of tiles is selected (1.0: every tile, i.e. dense).

Parts 2 and 3 only ever add tiles, so the lesion coverage that calibration certifies for the threshold holds
for the whole rule. `Gate` keeps the rule as buffers of the network, so it travels in `network_weights`,
which is all the stock predictor loads: the checkpoint is the one record of the rule.
"""
import math
from dataclasses import dataclass, replace
from typing import Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

# the threshold logit of a gate nobody calibrated: p(select) > 0.5
UNCALIBRATED_THRESHOLD = 0.0


@dataclass(frozen=True)
class GateRule:
    """What the gate does with a case's tile logits (see the module docstring)."""
    threshold: float = UNCALIBRATED_THRESHOLD   # logit units
    floor: float = 0.0                          # share of each case's tiles always selected, by rank
    envelope: Optional[Tuple[float, float]] = None  # (low, high) of the case's baseline logit; None: no check
    fallback_selection: float = 1.0             # share of top tiles selected outside the envelope
    calibrated: bool = False

    def __post_init__(self):
        if math.isnan(self.threshold):
            raise ValueError("gate threshold is NaN")
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError(f"gate floor must be a share of tiles in [0, 1], got {self.floor}")
        if not 0.0 < self.fallback_selection <= 1.0:
            raise ValueError(f"gate fallback_selection must be in (0, 1], got {self.fallback_selection}")
        if self.envelope is not None:
            low, high = self.envelope
            if not low <= high:
                raise ValueError(f"gate envelope must be (low, high) with low <= high, got {self.envelope}")

    def with_threshold(self, threshold: float) -> "GateRule":
        return replace(self, threshold=float(threshold))

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "floor": self.floor,
                "envelope": None if self.envelope is None else list(self.envelope),
                "fallback_selection": self.fallback_selection, "calibrated": self.calibrated}

    @classmethod
    def from_dict(cls, d: Mapping) -> "GateRule":
        env = d.get("envelope")
        return cls(threshold=float(d["threshold"]), floor=float(d.get("floor", 0.0)),
                   envelope=None if env is None else (float(env[0]), float(env[1])),
                   fallback_selection=float(d.get("fallback_selection", 1.0)),
                   calibrated=bool(d.get("calibrated", False)))


@dataclass
class GateDecision:
    """One case's decision and why each tile is in it."""
    selected: torch.Tensor   # (T,) bool
    by_threshold: int        # tiles above the threshold
    by_floor: int            # tiles the floor added
    fallback: bool           # the case fell outside the envelope
    by_fallback: int         # tiles the fallback added
    statistic: float         # the case's baseline: 10th-percentile tile logit (nan without tiles)


def _check_logits(logits: torch.Tensor) -> torch.Tensor:
    if logits.ndim != 1:
        raise ValueError(f"expected Glance logits of shape (T,), got {tuple(logits.shape)}")
    if torch.isnan(logits).any():
        raise ValueError("Glance produced NaN scores; is there NaN in the input image?")
    return logits


def select_tiles(logits: torch.Tensor, threshold: float | torch.Tensor, check_values: bool = True) -> torch.Tensor:
    """The per-tile part of the gate: logits (T,) > threshold (logit units) -> bool (T,). NaN raises (a NaN
    input must never turn into "healthy"); `check_values=False` skips that check, which reads the device (the
    training step's selection metric, where a non-finite logit is counted and skipped instead)."""
    return (_check_logits(logits) if check_values else logits) > threshold


def top_share(logits: torch.Tensor, share: float) -> torch.Tensor:
    """bool (T,): the ceil(share * T) tiles with the highest logits (ties broken by tile order)."""
    n = len(_check_logits(logits))
    k = min(n, math.ceil(share * n - 1e-9)) if share > 0 else 0
    mask = torch.zeros(n, dtype=torch.bool, device=logits.device)
    if k:
        # stable sort of the negated logits: the highest first, equal logits in tile order
        mask[torch.sort(-logits.double(), stable=True).indices[:k]] = True
    return mask


BASELINE_QUANTILE = 0.1


def baseline_logit(scores) -> float:
    """The case's baseline: the 10th percentile of its tile logits (the lower order statistic, no interpolation),
    where its healthiest tiles sit. Lesions do not move it (the median moves with a case's lesion load: from -35
    to -7 logits between ordinary cases of the method benchmark), a scanner the Glance does not know may."""
    values = sorted(float(v) for v in scores)
    return values[int(BASELINE_QUANTILE * (len(values) - 1))] if values else float("nan")


def case_statistic(logits: torch.Tensor) -> float:
    """The fallback's statistic of a case's tile logits (T,): `baseline_logit`."""
    return baseline_logit(_check_logits(logits).double().cpu().tolist())


def decide(logits: torch.Tensor, rule: GateRule) -> GateDecision:
    """The gate's decision for one case's tile logits (T,) (module docstring)."""
    by_threshold = select_tiles(logits, rule.threshold)
    selected = by_threshold | top_share(logits, rule.floor)
    n_floor = int(selected.sum()) - int(by_threshold.sum())
    statistic = case_statistic(logits)
    fallback = rule.envelope is not None and len(logits) > 0 and \
        not rule.envelope[0] <= statistic <= rule.envelope[1]
    n_fallback = 0
    if fallback:
        before = int(selected.sum())
        selected = selected | top_share(logits, rule.fallback_selection)
        n_fallback = int(selected.sum()) - before
    return GateDecision(selected, int(by_threshold.sum()), n_floor, bool(fallback), n_fallback, statistic)


def pool_rules(rules: Sequence[GateRule]) -> GateRule:
    """One rule for a fold ensemble, which gates on the mean of the folds' logits: the mean threshold (if the
    folds' logits differed by a constant shift, their thresholds would shift with them), the largest floor and
    fallback share, the mean envelope; calibrated only if every fold is."""
    if not rules:
        raise ValueError("no fold rules to pool")
    envelopes = [r.envelope for r in rules]
    envelope = None if any(e is None for e in envelopes) else \
        (sum(e[0] for e in envelopes) / len(rules), sum(e[1] for e in envelopes) / len(rules))
    return GateRule(threshold=sum(r.threshold for r in rules) / len(rules), floor=max(r.floor for r in rules),
                    envelope=envelope, fallback_selection=max(r.fallback_selection for r in rules),
                    calibrated=all(r.calibrated for r in rules))


class Gate(nn.Module):
    """The gate rule as buffers of the network (saved in `network_weights`; float64 where it matters)."""
    PREFIX = "gate."

    def __init__(self, rule: GateRule = GateRule()):
        super().__init__()
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))
        self.register_buffer("floor", torch.zeros((), dtype=torch.float64))
        self.register_buffer("envelope", torch.zeros(2, dtype=torch.float64))
        self.register_buffer("has_envelope", torch.zeros((), dtype=torch.bool))  # no NaN buffers: equal twice
        self.register_buffer("fallback_selection", torch.ones((), dtype=torch.float64))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        self.set_rule(rule)

    def set_rule(self, rule: GateRule) -> None:
        with torch.no_grad():
            self.threshold.fill_(rule.threshold)
            self.floor.fill_(rule.floor)
            self.envelope.copy_(torch.tensor(rule.envelope or (0.0, 0.0), dtype=torch.float64))
            self.has_envelope.fill_(rule.envelope is not None)
            self.fallback_selection.fill_(rule.fallback_selection)
            self.calibrated.fill_(rule.calibrated)

    @property
    def rule(self) -> GateRule:
        return self.rule_from_state_dict(self.state_dict(), prefix="")

    @classmethod
    def rule_from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], prefix: str = PREFIX) -> GateRule:
        """The rule held by a state_dict (a fold's `network_weights` has it under 'gate.')."""
        if prefix + "threshold" not in state_dict:
            raise KeyError(f"no {prefix}threshold in the weights: not a GF-Screen network of this version "
                           f"(retrain, or run nnUNetv2_gfscreen_calibrate on it)")
        env = state_dict[prefix + "envelope"].double().tolist()
        return GateRule(threshold=float(state_dict[prefix + "threshold"]), floor=float(state_dict[prefix + "floor"]),
                        envelope=(env[0], env[1]) if bool(state_dict[prefix + "has_envelope"]) else None,
                        fallback_selection=float(state_dict[prefix + "fallback_selection"]),
                        calibrated=bool(state_dict[prefix + "calibrated"]))

    @classmethod
    def write_rule_into_state_dict(cls, state_dict: dict, rule: GateRule, prefix: str = PREFIX) -> None:
        """Set the rule's buffers in a state_dict in place (a checkpoint's `network_weights`, a fold's weights)."""
        gate = cls(rule)
        for k, v in gate.state_dict().items():
            state_dict[prefix + k] = v.clone()

    def decide(self, logits: torch.Tensor) -> GateDecision:
        return decide(logits, self.rule)
