"""The one way this package writes files: to a temporary name beside the target, then `os.replace`.

A reader (or a crash, or SIGKILL) never sees a half-written output file: there is either the old file, the
complete new one, or (after SIGKILL only) a hidden `.NAME.partial*` file that no nnU-Net listing of cases takes
for a case unless `suffix` keeps the real ending (then pass `tmp_dir`, a folder outside the listed one).
"""
import json
import os
import threading
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch


@contextmanager
def atomic_path(path: str, suffix: str = "", tmp_dir: Optional[str] = None) -> Iterator[str]:
    """Yield a temporary path to write; on success it replaces `path`, on any exception it is removed.

    suffix: appended to the temporary name, for writers that pick the format from the ending ('.nii.gz').
    tmp_dir: folder for the temporary file (same file system as `path`); default: `path`'s folder.
    """
    folder, name = os.path.split(os.path.abspath(path))
    tmp_dir = folder if tmp_dir is None else tmp_dir
    os.makedirs(tmp_dir, exist_ok=True)
    tmp = os.path.join(tmp_dir, f".{name}.partial{os.getpid()}_{threading.get_ident()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(obj: Any, path: str, indent: int = 1) -> str:
    """json.dump `obj` to `path` atomically; returns path."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
    return path


def torch_save(obj: Any, path: str) -> str:
    """torch.save `obj` to `path` atomically; returns path."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path
