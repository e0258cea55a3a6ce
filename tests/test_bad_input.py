"""Bad input and faults, as a user meets them: real ``train.py`` / ``eval.py`` processes on tiny settings.

The contract (README, "Bad input"): the run ends with exit code 1 and one line ``error: ...`` that names the
bad value and says what to do, also appended to the run's log; no Python traceback; no file written before
(by the user or an earlier run) is changed or removed.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

# the smallest DINO run: 1 block, batch 8, no local crops, no callbacks, CSV only
TINY = [
    "data.source=embedded",
    "data.batch_size=8",
    "data.eval_bank_size=100",
    "data.eval_test_size=50",
    "++backbone.depth=1",
    "method.out_dim=64",
    "method.hidden_dim=32",
    "method.bottleneck_dim=16",
    "method.views.num_local=0",
    "logger=[csv]",
    "callbacks=[]",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "final_eval.baselines=false",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}
IS_ROOT = os.geteuid() == 0


def run(script: str, *args: str, cwd: Path, env: dict | None = None, timeout: float = 300):
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or ENV,
    )


def tiny_for(args: list[str]) -> list[str]:
    """TINY without the settings of a config group that ``args`` swaps (method=mae has no out_dim)."""
    groups = [a.split("=")[0] for a in args if "=" in a and "." not in a.split("=")[0]]
    return [t for t in TINY if not any(t.startswith(f"{g}.") for g in groups)]


def start(script: str, *args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )


def digest(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Every file under ``root`` -> sha256 of its bytes (names in ``skip`` left out)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in skip:
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def error_line(r: subprocess.CompletedProcess) -> str:
    """The run's one ``error:`` line, after checking there is exactly one and no traceback."""
    both = r.stdout + r.stderr
    assert "Traceback" not in both, both[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, r.stderr[-3000:]
    return lines[0]


def mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if not IS_ROOT:
        return False
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return r.returncode == 0


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount_ro(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


def csv_steps(run_dir: Path) -> list[int]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One trained tiny run (2 steps, a checkpoint each step) and broken copies of its checkpoint."""
    root = tmp_path_factory.mktemp("bad_input")
    trained = root / "trained"
    r = run(
        "train.py",
        *TINY,
        "trainer.max_steps=2",
        "checkpoint.every_n_steps=1",
        f"hydra.run.dir={trained}",
        cwd=root,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    last = trained / "checkpoints" / "last.ckpt"
    bad = root / "bad"
    bad.mkdir()
    data = last.read_bytes()
    (bad / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (bad / "random.ckpt").write_bytes(os.urandom(4096))
    (bad / "empty.ckpt").write_bytes(b"")
    torch.save({"state_dict": {}}, bad / "foreign.ckpt")
    torch.save([1, 2, 3], bad / "list.ckpt")
    (bad / "a_file").write_text("not a directory\n")
    ro = root / "readonly"
    if mount_tmpfs(ro, "1m"):
        remount_ro(ro)
    else:
        ro = None
    yield {"root": root, "trained": trained, "ckpt": last, "bad": bad, "ro": ro}
    if ro is not None:
        umount(ro)


# (id, script, arguments, fragments the error line must hold (the bad value first), heavy)
# {ckpt}: the shared run's last.ckpt, {trained}: its directory, {bad}: broken files, {ro}: a read-only mount
CASES = [
    ("max_steps_abc", "train.py", ["trainer.max_steps=abc"], ["trainer.max_steps=abc"], False),
    ("max_steps_negative", "train.py", ["trainer.max_steps=-5"], ["trainer.max_steps=-5"], False),
    ("max_steps_zero", "train.py", ["trainer.max_steps=0"], ["trainer.max_steps=0"], False),
    ("max_steps_float", "train.py", ["trainer.max_steps=1.5"], ["trainer.max_steps=1.5"], False),
    ("max_epochs_zero", "train.py", ["trainer.max_epochs=0"], ["trainer.max_epochs=0"], False),
    ("train_forever", "train.py", ["trainer.max_steps=-1", "trainer.max_epochs=-1"], ["forever"], False),
    (
        "accumulate_zero",
        "train.py",
        ["++trainer.accumulate_grad_batches=0"],
        ["accumulate_grad_batches=0"],
        False,
    ),
    ("batch_size_zero", "train.py", ["data.batch_size=0"], ["data.batch_size=0"], False),
    ("batch_size_negative", "train.py", ["data.batch_size=-3"], ["data.batch_size=-3"], False),
    ("batch_size_text", "train.py", ["data.batch_size=big"], ["data.batch_size=big"], False),
    ("num_workers_negative", "train.py", ["data.num_workers=-1"], ["data.num_workers=-1"], False),
    ("eval_bank_zero", "train.py", ["data.eval_bank_size=0"], ["data.eval_bank_size=0"], False),
    ("imagefolder_no_path", "train.py", ["data=imagefolder"], ["data.path is not set"], False),
    ("base_lr_zero", "train.py", ["method.base_lr=0"], ["method.base_lr=0"], False),
    ("base_lr_negative", "train.py", ["method.base_lr=-0.001"], ["method.base_lr=-0.001"], False),
    ("base_lr_text", "train.py", ["method.base_lr=fast"], ["method.base_lr=fast"], False),
    ("base_lr_nan", "train.py", ["method.base_lr=nan"], ["method.base_lr=nan"], False),
    ("weight_decay_negative", "train.py", ["method.weight_decay=-0.1"], ["method.weight_decay=-0.1"], False),
    ("grad_clip_zero", "train.py", ["method.grad_clip=0"], ["method.grad_clip=0"], False),
    ("depth_zero", "train.py", ["++backbone.depth=0"], ["backbone.depth=0"], False),
    ("every_n_negative", "train.py", ["checkpoint.every_n_steps=-1"], ["checkpoint.every_n_steps=-1"], False),
    ("save_top_k_bad", "train.py", ["checkpoint.save_top_k=-2"], ["checkpoint.save_top_k=-2"], False),
    ("seed_text", "train.py", ["seed=abc"], ["seed=abc"], False),
    ("resume_schedules_bad", "train.py", ["resume_schedules=maybe"], ["resume_schedules=maybe"], False),
    ("reset_without_resume", "train.py", ["resume_schedules=reset"], ["resume_schedules=reset"], False),
    ("resume_missing_file", "train.py", ["resume=/no/such.ckpt"], ["resume=/no/such.ckpt"], False),
    ("init_from_missing", "train.py", ["init_from=/no/such.ckpt"], ["init_from=/no/such.ckpt"], False),
    ("output_dir_is_a_file", "train.py", ["paths.output_dir={bad}/a_file/out"], ["{bad}/a_file/out"], False),
    ("output_dir_readonly", "train.py", ["paths.output_dir={ro}/out"], ["{ro}/out", "Read-only"], False),
    ("run_dir_locked", "train.py", ["hydra.run.dir={locked}"], ["{locked}", "in use by a live run"], False),
    ("eval_without_ckpt", "eval.py", [], ["ckpt is not set"], False),
    ("eval_missing_ckpt", "eval.py", ["ckpt=/no/such.ckpt"], ["ckpt=/no/such.ckpt"], False),
    ("eval_ckpt_is_dir", "eval.py", ["ckpt={trained}"], ["ckpt={trained}"], False),
    ("eval_knn_k_zero", "eval.py", ["ckpt={ckpt}", "knn.k=0"], ["knn.k=0"], False),
    (
        "eval_linear_epochs_text",
        "eval.py",
        ["ckpt={ckpt}", "linear.epochs=ten"],
        ["linear.epochs=ten"],
        False,
    ),
    ("eval_device_bad", "eval.py", ["ckpt={ckpt}", "device=tpu"], ["device=tpu"], False),
    ("eval_truncated", "eval.py", ["ckpt={bad}/truncated.ckpt"], ["{bad}/truncated.ckpt"], True),
    ("eval_random_bytes", "eval.py", ["ckpt={bad}/random.ckpt"], ["{bad}/random.ckpt"], True),
    ("eval_foreign", "eval.py", ["ckpt={bad}/foreign.ckpt"], ["{bad}/foreign.ckpt", "no sslab_config"], True),
    ("resume_truncated", "train.py", ["resume={bad}/truncated.ckpt"], ["resume={bad}/truncated.ckpt"], True),
    ("resume_random_bytes", "train.py", ["resume={bad}/random.ckpt"], ["resume={bad}/random.ckpt"], True),
    ("resume_empty", "train.py", ["resume={bad}/empty.ckpt"], ["resume={bad}/empty.ckpt"], True),
    ("resume_foreign", "train.py", ["resume={bad}/foreign.ckpt"], ["resume={bad}/foreign.ckpt"], True),
    (
        "resume_other_method",
        "train.py",
        ["resume={ckpt}", "method=mae"],
        ["resume={ckpt}", "checkpoint of dino vit_t (1 blocks) at step 2", "asks for mae"],
        True,
    ),
    (
        "resume_other_depth",
        "train.py",
        ["resume={ckpt}", "++backbone.depth=2"],
        ["resume={ckpt}", "other architecture", "asks for dino vit_t (2 blocks)"],
        True,
    ),
    (
        "resume_other_width",
        "train.py",
        ["resume={trained}", "method.out_dim=128"],
        ["resume={ckpt}", "other architecture", "at step 2"],
        True,
    ),
    (
        "resume_auto_none_compatible",
        "train.py",
        ["resume=auto", "paths.output_dir={root}", "method=mae"],
        ["resume=auto found no compatible run", "{trained}", "dino vit_t (1 blocks) at step 2"],
        True,
    ),
    ("resume_auto_nothing", "train.py", ["resume=auto"], ["resume=auto found no checkpoints"], True),
    (
        "nan_before_any_checkpoint",
        "train.py",
        ["method.base_lr=1e38", "method.warmup_epochs=0", "method.grad_clip=null", "trainer.max_steps=20"],
        ["loss is", "No checkpoint from before step", "method.base_lr (now 1e+38)"],
        True,
    ),
]


@pytest.mark.parametrize(
    ("script", "args", "fragments"),
    [
        pytest.param(script, args, fragments, id=name, marks=[pytest.mark.slow] if heavy else [])
        for name, script, args, fragments, heavy in CASES
    ],
)
def test_bad_input_ends_in_one_line(shared, tmp_path, script, args, fragments):
    from sslab.rundir import acquire_run_dir, release_run_dir

    if any("{ro}" in a for a in args) and shared["ro"] is None:
        pytest.skip("a read-only mount needs root (mount -t tmpfs)")
    locked = tmp_path / "locked"
    values = {k: str(v) for k, v in shared.items()} | {"locked": str(locked)}
    args = [a.format(**values) for a in args]
    fragments = [f.format(**values) for f in fragments]
    out = tmp_path / "out"
    written = (shared["trained"], shared["bad"])  # what a user or an earlier run wrote
    before = [digest(d) for d in written]
    locked.mkdir()
    acquire_run_dir(locked)  # as a live run would hold it (flock from this process)
    try:
        extra = [f"paths.output_dir={out}"] if not any(a.startswith("paths.output_dir") for a in args) else []
        r = (
            run(script, *tiny_for(args), *extra, *args, cwd=tmp_path)
            if script == "train.py"
            else run(script, *args, cwd=tmp_path, env={**ENV, "SSLAB_EVAL_DIR": str(out)})
        )
    finally:
        release_run_dir(locked)
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    line = error_line(r)
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert [digest(d) for d in written] == before  # nothing written before was changed or removed
    assert not list(locked.iterdir())[1:]  # the locked directory got nothing but its lock file
    logs = list(out.rglob("train.log")) + list(out.rglob("eval.log"))
    if logs:  # the run got as far as its own directory: the line is in its log too
        assert any(line in p.read_text() for p in logs), [p.read_text()[-2000:] for p in logs]


# -- faults with real processes ------------------------------------------------------------------------
@pytest.mark.slow
def test_kill_during_checkpoint_write_then_resume_in_place(tmp_path):
    """kill -9 while a checkpoint is being written: the next run in the same directory takes over the stale
    lock, deletes the orphan temporary, resumes from last.ckpt and appends to metrics.csv."""
    run_dir = tmp_path / "run"
    args = [*TINY, "++backbone.depth=4", "checkpoint.every_n_steps=1", f"hydra.run.dir={run_dir}"]
    ckpts = run_dir / "checkpoints"
    for _attempt in range(5):
        proc = start("train.py", *args, "trainer.max_steps=200", cwd=tmp_path)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            temps = list(ckpts.glob(".*.tmp-*")) if ckpts.is_dir() else []
            if temps and (ckpts / "last.ckpt").exists():
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait()
        proc.stdout.close()
        if list(ckpts.glob(".*.tmp-*")):
            break
    else:
        pytest.fail("never caught a checkpoint write in progress")
    assert proc.returncode == -signal.SIGKILL
    killed_at = torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"]
    rows_before = csv_steps(run_dir) if (run_dir / "csv" / "metrics.csv").exists() else []
    r = run("train.py", *args, f"trainer.max_steps={killed_at + 2}", f"resume={run_dir}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not list(ckpts.glob(".*.tmp-*"))
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == killed_at + 2
    steps = csv_steps(run_dir)
    assert steps[: len(rows_before)] == rows_before and steps[-2:] == [killed_at, killed_at + 1]


@pytest.mark.slow
def test_two_runs_on_one_run_dir(tmp_path):
    """The second run refuses at once and writes nothing; after the first is killed the lock is free."""
    run_dir = tmp_path / "run"
    first = start("train.py", *TINY, "trainer.max_steps=100000", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "csv" / "metrics.csv").exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.2)
        config = (run_dir / ".hydra" / "config.yaml").read_bytes()
        second = run(
            "train.py", *TINY, "seed=7", "trainer.max_steps=2", f"hydra.run.dir={run_dir}", cwd=tmp_path
        )
        assert second.returncode == 1
        line = error_line(second)
        assert str(run_dir) in line and f"pid {first.pid}" in line
        assert (run_dir / ".hydra" / "config.yaml").read_bytes() == config
        assert not list((run_dir / ".hydra").glob("launch-*"))
    finally:
        first.kill()
        first.wait()
        first.stdout.close()
    third = run("train.py", *TINY, "trainer.max_steps=2", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]  # a dead run's lock is taken over


@pytest.mark.slow
@pytest.mark.skipif(not IS_ROOT, reason="mounting a tmpfs needs root")
def test_disk_full_on_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    if not mount_tmpfs(mnt, "2m"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        r = run("train.py", *TINY, "trainer.max_steps=3", f"paths.output_dir={mnt}", cwd=tmp_path)
        assert r.returncode == 1
        line = error_line(r)
        assert "disk full" in line or "the disk is full" in line, line
        assert str(mnt) in line
        assert not list(mnt.rglob(".*.tmp-*"))  # no half-written temporary left behind
    finally:
        umount(mnt)


@pytest.mark.slow
@pytest.mark.skipif(not IS_ROOT, reason="a read-only mount needs root")
def test_read_only_checkpoints_folder(shared, tmp_path):
    """checkpoints/ on a read-only mount: one line about the checkpoint, not a second error from clean-up."""
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    if not mount_tmpfs(ckpts, "1m"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        remount_ro(ckpts)
        r = run("train.py", *TINY, "trainer.max_steps=2", f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert r.returncode == 1
        line = error_line(r)
        assert f"cannot write checkpoint {ckpts}" in line and "Read-only file system" in line, line
        assert line in (run_dir / "train.log").read_text()
    finally:
        umount(ckpts)


@pytest.mark.slow
def test_nan_advice_recovers(tmp_path):
    """A run that diverges (NaN at step 38 at this rate): the command printed in its one line, run as printed,
    continues the kept checkpoint's weights at a tenth of the rate under that rate's schedule and finishes."""
    out = tmp_path / "out"
    diverge = [*TINY, "method.base_lr=1e3", "method.grad_clip=null", "checkpoint.every_n_steps=5"]
    r = run("train.py", *diverge, "trainer.max_steps=40", f"paths.output_dir={out}", cwd=tmp_path)
    assert r.returncode == 1, r.stderr[-3000:]
    line = error_line(r)
    m = re.search(
        r"loss is \S+ at step (\d+).* is kept: (\S+) \(step (\d+)\).*schedule: (python train\.py .*?) \(",
        line,
    )
    assert m, line
    nan_step, kept, kept_step = int(m.group(1)), Path(m.group(2)), int(m.group(3))
    assert kept_step < nan_step and kept.is_file()
    state = torch.load(kept, weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())
    assert all(int(p.name[4:10]) < nan_step for p in kept.parent.glob("step*.ckpt"))
    assert torch.load(kept.parent / "last.ckpt", weights_only=False)["global_step"] == kept_step
    assert line in next(out.rglob("train.log")).read_text()
    command = shlex.split(m.group(4))
    assert command[:2] == ["python", "train.py"] and "method.base_lr=100" in command
    again = run("train.py", *command[2:], cwd=tmp_path)  # exactly as printed
    assert again.returncode == 0, again.stderr[-3000:]
    assert '"global_step": 40' in again.stdout


@pytest.mark.slow
def test_slurm_requeue_appends_to_metrics_csv(shared, tmp_path):
    """A requeued SLURM job resumes its own run directory and keeps the rows from before the requeue."""
    import shutil

    run_dir = tmp_path / "job"
    shutil.copytree(shared["trained"], run_dir)
    before = csv_steps(run_dir)
    env = {**ENV, "SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "1"}
    r = run("train.py", *TINY, "trainer.max_steps=4", f"hydra.run.dir={run_dir}", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert before == [0, 1] and csv_steps(run_dir) == [0, 1, 2, 3]
    assert "dataloader is not resumable" not in r.stdout + r.stderr
    assert (run_dir / ".hydra" / "config.yaml").read_bytes() == (
        shared["trained"] / ".hydra" / "config.yaml"
    ).read_bytes()


@pytest.mark.slow
def test_resume_auto_skips_a_newer_run_of_another_method(shared, tmp_path):
    out = tmp_path / "out"
    good = out / "old" / "checkpoints" / "last.ckpt"
    newer = out / "new" / "checkpoints" / "last.ckpt"
    for p in (good, newer):
        p.parent.mkdir(parents=True)
    ckpt = torch.load(shared["ckpt"], weights_only=False)
    torch.save(ckpt, good)
    ckpt["sslab_config"]["method"]["name"] = "mae"
    torch.save(ckpt, newer)
    os.utime(good, (time.time() - 60,) * 2)
    r = run("train.py", *TINY, "trainer.max_steps=3", "resume=auto", f"paths.output_dir={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'"resumed_from": "{good}"' in r.stdout
