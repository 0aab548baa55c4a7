"""Per-case notice of the torch I/O out-of-memory fallback (used by GFScreenPredictor's preprocess/export steps)."""
import re
import threading
import warnings
from contextlib import contextmanager
from typing import Iterator, List

# preprocess_case_torch / export_logits_torch warn when they redo a case on the CPU; Python shows a warning once
# per code location, and the message does not name the case. The hook below hands those warnings to the thread
# that is preprocessing/exporting a case, which prints one line naming the case (threads: see pipeline.py).
_OOM_FALLBACK = r'(preprocess_case_torch|export_logits_torch): out of memory'
_tls = threading.local()
_hook_lock = threading.Lock()


def _showwarning_with_oom_notes(message, category, filename, lineno, file=None, line=None):
    notes = getattr(_tls, 'oom_notes', None)
    if notes is not None and re.match(_OOM_FALLBACK, str(message)):
        notes.append(str(message))
        return
    _showwarning_with_oom_notes.previous(message, category, filename, lineno, file, line)


@contextmanager
def oom_fallback_notes() -> Iterator[List[str]]:
    """Collect (instead of showing) this thread's OOM-fallback warnings of the torch I/O functions."""
    with _hook_lock:
        if warnings.showwarning is not _showwarning_with_oom_notes:
            _showwarning_with_oom_notes.previous = warnings.showwarning
            warnings.showwarning = _showwarning_with_oom_notes
        # shown for every case, not once per process; added once (each change of the filters resets which
        # other warnings count as already shown)
        if not any(f[0] == 'always' and f[1] is not None and f[1].pattern == _OOM_FALLBACK for f in warnings.filters):
            warnings.filterwarnings('always', message=_OOM_FALLBACK)
    _tls.oom_notes = notes = []
    try:
        yield notes
    finally:
        _tls.oom_notes = None
