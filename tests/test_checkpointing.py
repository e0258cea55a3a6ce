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


def test_resume_auto_skips_incompatible_candidates_and_names_them(tmp_path):
    runs = [tmp_path / d / "checkpoints" / "last.ckpt" for d in ("a", "b")]
    for i, p in enumerate(runs):
        p.parent.mkdir(parents=True)
        p.write_bytes(b"x")
        os.utime(p, (time.time() - 100 + i * 50,) * 2)  # b is newer

    def vet(path):
        return ("dino vit_t", None) if path == runs[0] else ("mae vit_t", "method mae, not dino")

    assert find_resume_checkpoint("auto", tmp_path, vet=vet) == runs[0]
    with pytest.raises(SSLabError, match=r"no compatible run.*b \(mae vit_t: method mae, not dino\)"):
        find_resume_checkpoint("auto", tmp_path, vet=lambda p: ("mae vit_t", "method mae, not dino"))


def test_read_only_write_reports_the_first_error_not_the_cleanup(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(args[0]))

    monkeypatch.setattr("builtins.open", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(
        SSLabError, match=r"cannot write checkpoint .*last\.ckpt: Read-only file system; the previous"
    ):
        atomic_torch_save({"a": 1}, tmp_path / "last.ckpt")


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    from sslab.rundir import remove_stale_temporaries

    dead = tmp_path / ".step000004.ckpt.tmp-999999999"
    alive = tmp_path / f".last.ckpt.tmp-{os.getppid()}"
    keep = tmp_path / "step000004.ckpt"
    for p in (dead, alive, keep):
        p.write_bytes(b"partial")
    assert remove_stale_temporaries(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, keep.name])


def test_run_dir_lock_refuses_another_process_and_is_reentrant(tmp_path):
    import subprocess
    import sys

    from sslab.rundir import acquire_run_dir, release_run_dir

    assert acquire_run_dir(tmp_path) is True
    try:
        assert acquire_run_dir(tmp_path) is False  # this process holds it already
        code = f"from sslab.rundir import acquire_run_dir; acquire_run_dir({str(tmp_path)!r})"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode != 0 and f"is in use by a live run (pid {os.getpid()})" in r.stderr
    finally:
        release_run_dir(tmp_path)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
