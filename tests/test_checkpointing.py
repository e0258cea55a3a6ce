import os
import time

import pytest
import torch

from sslab.checkpoint_io import atomic_torch_save
from sslab.errors import SSLabError
from sslab.resume import find_resume_checkpoint


def test_resume_auto_picks_newest_last_checkpoint(tmp_path):
    old = tmp_path / "2026-01-01" / "10-00-00" / "checkpoints" / "last.ckpt"
    new = tmp_path / "2026-01-02" / "09-00-00" / "checkpoints" / "last.ckpt"
    for i, p in enumerate((old, new)):
        p.parent.mkdir(parents=True)
        p.write_bytes(b"x")
        os.utime(p, (time.time() - 100 + i * 50,) * 2)
    assert find_resume_checkpoint("auto", tmp_path) == new
    assert find_resume_checkpoint("auto", tmp_path, current_run=new.parents[1]) == old
    assert find_resume_checkpoint(str(old.parents[1]), tmp_path) == old  # a run directory
    assert find_resume_checkpoint(None, tmp_path) is None
    with pytest.raises(SSLabError, match=r"found no checkpoints/last\.ckpt"):
        find_resume_checkpoint("auto", tmp_path / "empty")


def test_atomic_save_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"a": torch.ones(3)}, path)
    atomic_torch_save({"a": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path)["a"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_failed_save_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"a": torch.ones(3)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom half-way through the write")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"big": torch.zeros(1000), "bad": Unpicklable()}, path)
    assert torch.equal(torch.load(path)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_full_disk_keeps_previous_checkpoint_and_says_so(tmp_path):
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        path = mnt / "last.ckpt"
        atomic_torch_save({"w": torch.ones(10_000)}, path)  # 40 kB fits
        with pytest.raises(
            SSLabError, match=r"disk full while writing checkpoint .*previous checkpoint is untouched"
        ):
            atomic_torch_save({"w": torch.ones(200_000)}, path)  # 800 kB does not
        assert torch.equal(torch.load(path)["w"], torch.ones(10_000))
        assert [p.name for p in mnt.iterdir()] == ["last.ckpt"]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
