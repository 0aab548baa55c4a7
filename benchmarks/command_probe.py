"""Run one prediction command as its console script does, and record what it cost (benchmarks/bench_commands.py).

  python benchmarks/command_probe.py PROBE.json [--count_gate] -- nnUNetv2_predict -i ... -o ...

The command's entry function runs in this process, exactly as the installed console script calls it; around it
the probe records, into PROBE.json: when the interpreter got here and when the command's module was imported
(time.time(), so the caller can subtract its launch time), the seconds of `initialize_from_trained_model_folder`
(model loading: the trainer class lookup, the checkpoint, the network), the peak resident memory of this process
and of its largest child (worker processes), and on CUDA torch's peak GPU memory. `--count_gate` also counts the
tiles the GF-Screen network's gate scores and selects (the stock `nnUNetv2_predict -tr <GF-Screen trainer>`
path, which reports nothing itself). None of this changes what the command computes.
"""
import json
import resource
import sys
import time
from contextlib import ExitStack, contextmanager

T_STARTED = time.time()

# console script name -> "module:function", as the packages' entry points declare them
# (tests/test_bench_commands.py checks these against the installed metadata)
ENTRY_POINTS = {
    "nnUNetv2_predict": "nnunetv2.inference.predict_from_raw_data:predict_entry_point",
    "nnUNetv2_predict_gfscreen": "nnunetv2_gfscreen.predictors.cli:predict_gfscreen_entry_point",
}


def _peak_rss_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0  # Linux: KiB


def _timed_model_loading(record: dict) -> None:
    """Add the seconds of every `initialize_from_trained_model_folder` call to record['model_loading_seconds']."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    original = nnUNetPredictor.initialize_from_trained_model_folder

    def timed(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            record["model_loading_seconds"] = record.get("model_loading_seconds", 0.0) + time.perf_counter() - t0

    nnUNetPredictor.initialize_from_trained_model_folder = timed


@contextmanager
def counting_gate(record: dict):
    """While open, count the tiles the GF-Screen network's gate scores (a flipped TTA copy reuses its tile's
    decision and is not scored again) and selects, into record['gate_tiles_scored'] and
    record['gate_tiles_selected']."""
    import nnunetv2_gfscreen.core.network as network
    original = network.select_tiles
    record.update(gate_tiles_scored=0, gate_tiles_selected=0)

    def counted(logits, threshold, *args, **kwargs):
        selected = original(logits, threshold, *args, **kwargs)
        record["gate_tiles_scored"] += int(selected.numel())
        record["gate_tiles_selected"] += int(selected.sum())
        return selected

    network.select_tiles = counted
    try:
        yield record
    finally:
        network.select_tiles = original


def _cuda_peak_gib():
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2 ** 30


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv or argv.index("--") < 1:
        raise SystemExit("usage: command_probe.py PROBE.json [--count_gate] -- COMMAND ARGS...")
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1:]
    probe_file, count_gate = options[0], "--count_gate" in options[1:]
    if not command or command[0] not in ENTRY_POINTS:
        raise SystemExit(f"command must be one of {sorted(ENTRY_POINTS)}, got {command[:1]}")
    module_name, function = ENTRY_POINTS[command[0]].split(":")
    record = {"command": command, "started": T_STARTED}
    import importlib
    entry = getattr(importlib.import_module(module_name), function)
    record["imported"] = time.time()
    _timed_model_loading(record)
    sys.argv = command
    code = 1
    try:
        with ExitStack() as stack:
            if count_gate:
                stack.enter_context(counting_gate(record))
            result = entry()
        code = result if isinstance(result, int) else 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        record.update(finished=time.time(), exit_code=code, peak_rss_self_mib=_peak_rss_mib(resource.RUSAGE_SELF),
                      peak_rss_children_mib=_peak_rss_mib(resource.RUSAGE_CHILDREN),
                      peak_gpu_memory_gib=_cuda_peak_gib())
        with open(probe_file, "w") as f:
            json.dump(record, f, indent=2)
    return code


if __name__ == "__main__":
    sys.exit(main())
