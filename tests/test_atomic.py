import json
import os

import pytest
import torch

from nnunetv2_gfscreen.atomic import atomic_path, torch_save, write_json


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "out.json")
    write_json({"v": 1}, path)
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            with open(tmp, "w") as f:
                f.write('{"v": 2')  # half written
            raise RuntimeError("crash mid-write")
    assert json.load(open(path)) == {"v": 1}
    assert os.listdir(tmp_path) == ["out.json"]


def test_suffix_and_tmp_dir_place_the_temporary_where_asked(tmp_path):
    path = str(tmp_path / "imagesTr" / "case.nii.gz")
    os.makedirs(os.path.dirname(path))
    with atomic_path(path, suffix=".nii.gz", tmp_dir=str(tmp_path / ".partial")) as tmp:
        assert tmp.endswith(".nii.gz") and os.path.dirname(tmp) == str(tmp_path / ".partial")
        assert not os.path.exists(path)
        open(tmp, "w").write("x")
    assert open(path).read() == "x" and os.listdir(tmp_path / ".partial") == []


def test_torch_save_round_trips(tmp_path):
    path = str(tmp_path / "c.pth")
    torch_save({"w": torch.arange(3)}, path)
    assert torch.equal(torch.load(path)["w"], torch.arange(3))
