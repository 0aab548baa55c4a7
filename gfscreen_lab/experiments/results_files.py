"""What an experiment reports besides its table: the machine it ran on and the Markdown results file."""
import json
import os
import platform
from typing import Dict, Sequence


def machine_description() -> str:
    """CPU model, cores, load and torch version: the context every measured time needs."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    import torch
    return (f"{model}, {os.cpu_count()} logical cores, load average {load} at the end of the run; "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, torch {torch.__version__}")


def results_markdown(title: str, table: str, settings: dict, step_seconds: Dict[str, float], machine: str,
                     notes: Sequence[str] = ()) -> str:
    """The results page of a run: the table, the machine and how long each step took."""
    lines = [f"# {title}", "", table.rstrip("\n"), ""]
    lines += [f"- {n}" for n in notes]
    lines += ["", f"Machine: {machine}", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in step_seconds.items()]
    lines += ["", "Settings:", "", "```json", json.dumps(settings, indent=2), "```", ""]
    return "\n".join(lines)
