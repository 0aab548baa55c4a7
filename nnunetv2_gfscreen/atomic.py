"""The one way this package writes files: to a temporary name beside the target, then `os.replace`.

A reader (or a crash, or SIGKILL) never sees a half-written output file: there is either the old file, the
complete new one, or (after SIGKILL only) a hidden `.NAME.partial<pid>_<thread>` file (`partial_name`), which
`stale_partials` finds so that a rerun can remove it. A writer that picks the format from the ending keeps it
(`suffix`); where a folder is listed as cases, put the temporary file elsewhere (`tmp_dir`).
"""
import json
import os
import re
import threading
from contextlib import contextmanager
from typing import Any, Iterator, List, Optional, Tuple

import torch


_STALE = re.compile(r"^\.(?P<target>.+?)\.partial\d+_\d+")


def partial_name(name: str) -> str:
    """The temporary name of file `name` while this thread writes it."""
    return f".{name}.partial{os.getpid()}_{threading.get_ident()}"


def stale_partials(folder: str) -> List[Tuple[str, str]]:
    """(path, name of the file it was to become) of every temporary file in `folder` named by `partial_name`."""
    if not os.path.isdir(folder):
        return []
    return [(os.path.join(folder, f), m.group("target")) for f in sorted(os.listdir(folder))
            if (m := _STALE.match(f))]


@contextmanager
def atomic_path(path: str, suffix: str = "", tmp_dir: Optional[str] = None,
                tmp: Optional[str] = None) -> Iterator[str]:
    """Yield a temporary path to write; on success it replaces `path`, on any exception it is removed.

    suffix: appended to the temporary name, for writers that pick the format from the ending ('.nii.gz').
    tmp_dir: folder for the temporary file (same file system as `path`); default: `path`'s folder.
    tmp: a fixed temporary path instead (large files such as checkpoints: a stale one is overwritten by the next
    write instead of piling up).
    """
    folder, name = os.path.split(os.path.abspath(path))
    if tmp is None:
        tmp_dir = folder if tmp_dir is None else tmp_dir
        os.makedirs(tmp_dir, exist_ok=True)
        tmp = os.path.join(tmp_dir, partial_name(name) + suffix)
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
