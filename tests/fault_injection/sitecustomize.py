"""Test-only fault injection: SIGKILL a real nnU-Net command at a chosen point (tests/test_e2e_cli.py).

Python imports `sitecustomize` at start-up from the first folder on sys.path that has one, so a test puts
this folder on PYTHONPATH and names the fault in GFSCREEN_FAULT; no production code knows about it.

- `train_steps:N`: kill right after the N-th GFScreenTrainer.train_step of the process (mid-epoch).
- `save:SUBSTRING`: the first torch.save to a path containing SUBSTRING writes half the bytes, then kills
  (a checkpoint write that started and never finished).
- `write_image:N`: the N-th SimpleITK.WriteImage writes a truncated file, then kills (an output written
  half-way).
"""
import io
import os
import signal

_KIND, _, _ARG = os.environ.get("GFSCREEN_FAULT", "").partition(":")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _write_half(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
    _die()


if _KIND == "train_steps":
    from nnunetv2_gfscreen.trainers.GFScreenTrainer import GFScreenTrainer

    _train_step, _count = GFScreenTrainer.train_step, [0]

    def _counting_train_step(self, batch):
        out = _train_step(self, batch)
        _count[0] += 1
        if _count[0] == int(_ARG):
            _die()
        return out

    GFScreenTrainer.train_step = _counting_train_step

elif _KIND == "save":
    import torch

    _save = torch.save

    def _half_save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and _ARG in os.fspath(f):
            buffer = io.BytesIO()
            _save(obj, buffer, *args, **kwargs)
            _write_half(f, buffer.getvalue())
        return _save(obj, f, *args, **kwargs)

    torch.save = _half_save

elif _KIND == "write_image":
    import SimpleITK

    _write_image, _writes = SimpleITK.WriteImage, [0]

    def _half_write_image(image, path, *args, **kwargs):
        _writes[0] += 1
        if _writes[0] == int(_ARG):
            _write_image(image, path, *args, **kwargs)
            with open(path, "rb") as f:
                _write_half(path, f.read())
        return _write_image(image, path, *args, **kwargs)

    SimpleITK.WriteImage = _half_write_image
