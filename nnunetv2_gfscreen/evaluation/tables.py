"""Markdown rendering of evaluation results (see ``evaluate_folder.evaluate_folders``)."""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

MISSING = "n/a"


def _pct(v: Optional[float]) -> str:
    return MISSING if v is None else f"{100 * v:.1f}"


def _num(digits: int) -> Callable[[Optional[float]], str]:
    return lambda v: MISSING if v is None else f"{v:.{digits}f}"


def _int(v: Optional[float]) -> str:
    return MISSING if v is None else str(int(v))


# (column header, key in the aggregate dict, formatter)
COMPARISON_COLUMNS: Tuple[Tuple[str, str, Callable], ...] = (
    ("DSC %", "dsc_mean", _pct),
    ("NSD %", "nsd_mean", _pct),
    ("lesion sensitivity %", "lesion_sensitivity", _pct),
    ("FP per case", "fp_per_case", _num(2)),
    ("healthy-case FP rate %", "healthy_fp_rate", _pct),
    ("selection ratio %", "selection_ratio_mean", _pct),
    ("s per case", "total_seconds_mean", _num(2)),
)

AGGREGATE_COLUMNS: Tuple[Tuple[str, str, Callable], ...] = (
    ("cases", "n_cases", _int),
    ("DSC %", "dsc_mean", _pct),
    ("NSD %", "nsd_mean", _pct),
    ("lesions", "n_lesions", _int),
    ("lesion sensitivity %", "lesion_sensitivity", _pct),
    ("lesion precision %", "lesion_precision", _pct),
    ("lesion F1 %", "lesion_f1", _pct),
    ("FP per case", "fp_per_case", _num(2)),
    ("case sensitivity %", "case_sensitivity", _pct),
    ("healthy-case FP rate %", "healthy_fp_rate", _pct),
    ("selection ratio %", "selection_ratio_mean", _pct),
    ("tile sensitivity %", "tile_sensitivity", _pct),
    ("tile specificity %", "tile_specificity", _pct),
    ("Glance s", "glance_seconds_mean", _num(2)),
    ("Focus s", "focus_seconds_mean", _num(2)),
    ("s per case", "total_seconds_mean", _num(2)),
)

PER_CASE_COLUMNS: Tuple[Tuple[str, str, Callable], ...] = (
    ("DSC %", "dsc", _pct),
    ("NSD %", "nsd", _pct),
    ("lesions", "n_lesions", _int),
    ("found", "n_found", _int),
    ("FP components", "n_fp_components", _int),
    ("selection ratio %", "selection_ratio", _pct),
    ("s", "total_seconds", _num(2)),
)


def _table(header: Sequence[str], rows: List[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _row(values: dict, columns: Sequence[Tuple[str, str, Callable]]) -> List[str]:
    return [fmt(values.get(key)) for _, key, fmt in columns]


def _aggregate_of(result: dict) -> dict:
    """Accept either a full result (with an ``aggregate`` entry) or the aggregate itself."""
    return result["aggregate"] if isinstance(result.get("aggregate"), dict) else result


def format_comparison_table(results: Dict[str, dict]) -> str:
    """One Markdown table comparing evaluated runs, e.g. ``{"dense": agg1, "gated": agg2}``.

    Each value is an aggregate dict (or a full result holding one under ``aggregate``). Columns:
    DSC, NSD, lesion sensitivity, FP per case, healthy-case FP rate, selection ratio, seconds per
    case; rates are in percent, values a run lacks are shown as ``n/a``.
    """
    if not results:
        raise ValueError("format_comparison_table needs at least one run")
    rows = [[str(name)] + _row(_aggregate_of(r), COMPARISON_COLUMNS) for name, r in results.items()]
    return _table(["run"] + [c[0] for c in COMPARISON_COLUMNS], rows)


def format_size_bins(size_bins: Sequence[dict]) -> str:
    """Markdown: lesion-level detection sensitivity per lesion-volume bin (``aggregate_detection``'s
    ``size_bins``)."""
    return _table(["GT lesion volume", "lesions", "found", "lesion sensitivity %"],
                  [[b["bin"], str(b["lesions"]), str(b["found"]), _pct(b["sensitivity"])] for b in size_bins])


def format_results_markdown(result: dict) -> str:
    """Markdown for one evaluation: an aggregate row table, detection by lesion volume (when counted) and a
    per-case table."""
    agg_cols = [c for c in AGGREGATE_COLUMNS if c[1] in result["aggregate"]]
    case_cols = [c for c in PER_CASE_COLUMNS if any(c[1] in r for r in result["per_case"])]
    by_size = result["aggregate"].get("size_bins")
    return ("## Aggregate\n\n" + _table([c[0] for c in agg_cols], [_row(result["aggregate"], agg_cols)])
            + ("\n## Lesion-level sensitivity by lesion volume (mm^3, ground truth)\n\n" + format_size_bins(by_size)
               if by_size else "")
            + "\n## Per case\n\n"
            + _table(["case"] + [c[0] for c in case_cols],
                     [[r["case"]] + _row(r, case_cols) for r in result["per_case"]]))
