"""SLURM on a real loopback cluster (tests/slurm_cluster.py): one sweep, submitted the way a user does it,
carries the three checks.

``python train.py -m hydra/launcher=slurm hydra.launcher.nodes=2 checkpoint.save_top_k=1,-1 ...`` submits two
jobs (the swept value does not change training), each a 2-node DDP run (one gloo process on node1, one on
node2). While job 1 trains, the test sends it SIGUSR1 (``scancel --signal=USR1``, as ``sbatch --signal`` does
before the time limit): it writes last.ckpt at the end of that step, requeues itself, starts again in its
own run directory and resumes. Job 0 runs uninterrupted, so job 1's final parameters must equal job 0's bit
for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from tests.conftest import ROOT, TINY
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (the session fixture)
from tests.wandb_file import records

STEPS, SIGNAL_AFTER = 12, 4


def wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"the sweep ended (rc {proc.returncode}) before {what}:\n{proc.stdout.read()[-4000:]}"
            )
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def sweep(slurm_cluster, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("slurm")
    tiny = [o for o in TINY if not o.startswith("logger=")]
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.nodes=2",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=10",
        "checkpoint.save_top_k=1,-1",
        *tiny,
        "logger=[csv,wandb]",
        "data.batch_size=8",
        "data.eval_bank_size=60",
        "data.eval_test_size=40",
        f"trainer.max_steps={STEPS}",
        f"checkpoint.every_n_steps={SIGNAL_AFTER}",
        f"paths.output_dir={out}",
    ]
    env = {**slurm_cluster.env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    for var in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        env.pop(var, None)  # a rendezvous left over from this process must not reach the jobs
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait(lambda: len(list(out.glob("multirun/*/*/.submitit/*_1"))) == 1, 60, "job 1's submission", proc)
        sweep_dir = next(out.glob("multirun/*/*"))
        job1 = next(sweep_dir.glob(".submitit/*_1")).name
        wait(
            lambda: (sweep_dir / "1" / "checkpoints" / f"step{SIGNAL_AFTER:06d}.ckpt").exists(),
            180,
            "job 1's first periodic checkpoint",
            proc,
        )
        slurm_cluster.run("scancel", "--signal=USR1", job1)
        signalled = time.monotonic() - start
        output, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    return {
        "rc": proc.returncode,
        "output": output,
        "sweep_dir": sweep_dir,
        "jobs": [next(sweep_dir.glob(f".submitit/*_{i}")).name for i in (0, 1)],
        "seconds": time.monotonic() - start,
        "signalled_at": signalled,
        "cluster": slurm_cluster,
    }


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slurm
def test_two_value_sweep_completes_each_run_in_its_own_dir_grouped_in_wandb(sweep):
    assert sweep["rc"] == 0, sweep["output"][-4000:]
    sweep_dir = sweep["sweep_dir"]
    for num, top_k in ((0, 1), (1, -1)):
        run_dir = sweep_dir / str(num)
        m = metrics(run_dir)
        assert m["run_dir"] == str(run_dir) and m["global_step"] == STEPS
        run_files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
        assert run_files, f"no W&B offline run in {run_dir}"
        run = next(r.run for r in records(run_files[-1]) if r.WhichOneof("record_type") == "run")
        assert run.run_group == str(sweep_dir)  # the sweep's runs share one group
        assert run.job_type == "dino"
        assert f"checkpoint.save_top_k={top_k}" in run.tags
    print(f"\nSLURM sweep of 2 jobs x 2 nodes, with one requeue: {sweep['seconds']:.0f} s")


@pytest.mark.slurm
def test_each_job_is_two_node_ddp_with_ranks_in_sync(sweep):
    assert sweep["rc"] == 0, sweep["output"][-4000:]
    for num, job in enumerate(sweep["jobs"]):
        m = metrics(sweep["sweep_dir"] / str(num))
        assert m["world_size"] == 2 and m["ranks_in_sync"] is True
        nodes = sweep["cluster"].run("sacct", "-j", job, "-X", "-n", "-P", "-o", "NodeList").split()
        assert nodes[-1] == "node[1-2]", nodes
        rank1_logs = (sweep["sweep_dir"] / ".submitit" / job).glob(f"{job}_1_log.*")
        assert "GLOBAL_RANK: 1, MEMBER: 2/2" in "".join(p.read_text() for p in rank1_logs)


@pytest.mark.slurm
def test_sigusr1_checkpoints_requeues_and_finishes_like_an_uninterrupted_run(sweep):
    assert sweep["rc"] == 0, sweep["output"][-4000:]
    cluster, (job0, job1) = sweep["cluster"], sweep["jobs"]
    assert cluster.job_field(job1, "Restarts") == "1" and cluster.job_field(job0, "Restarts") == "0"
    run0, run1 = sweep["sweep_dir"] / "0", sweep["sweep_dir"] / "1"
    log1 = "".join(p.read_text() for p in (sweep["sweep_dir"] / ".submitit" / job1).glob(f"{job1}_0_log.*"))
    assert "SIGUSR1 at step" in log1 and f"requeued SLURM job {job1}" in log1
    assert "preempted: SIGUSR1" in log1  # the first attempt exited without a result, so the launcher waited
    m1 = metrics(run1)
    assert m1["resumed_from"] == str(run1 / "checkpoints" / "last.ckpt")  # its own checkpoint
    assert "resumed_from" not in metrics(run0)

    a = torch.load(run0 / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    b = torch.load(run1 / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    different = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not different, different
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def test_own_checkpoint_wins_over_newer_runs_after_a_requeue(tmp_path, monkeypatch):
    """A requeued job resumes its own run, even when resume=auto would pick a newer run's checkpoint."""
    from sslab import cluster
    from sslab.resume import find_resume_checkpoint

    mine, newer = tmp_path / "a", tmp_path / "b"
    for d in (mine, newer):
        (d / "checkpoints").mkdir(parents=True)
        (d / "checkpoints" / "last.ckpt").write_bytes(b"x")
        time.sleep(0.02)
    assert find_resume_checkpoint("auto", tmp_path) == newer / "checkpoints" / "last.ckpt"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert cluster.own_checkpoint(mine) is None  # first run: resume= decides
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert cluster.own_checkpoint(mine) == mine / "checkpoints" / "last.ckpt"
    assert cluster.own_checkpoint(tmp_path / "fresh") is None  # requeued before any checkpoint: start over


def test_nodelist_and_trainer_settings_follow_the_allocation(monkeypatch):
    from sslab import cluster

    assert cluster.expand_nodelist("gpu[01-02,05],cpu7,n[9-10]") == [
        "gpu01",
        "gpu02",
        "gpu05",
        "cpu7",
        "n9",
        "n10",
    ]
    monkeypatch.setenv("SLURM_JOB_ID", "4321")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "localhost,n2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    kw = cluster.adapt_trainer_kwargs({"devices": 1, "strategy": "auto"})
    assert kw["num_nodes"] == 2 and kw["devices"] == 4 and kw["strategy"].__class__.__name__ == "DDPStrategy"
    cluster.setup_rendezvous()
    assert os.environ["MASTER_ADDR"] == "localhost" and os.environ["MASTER_PORT"] == str(20000 + 4321)
    monkeypatch.setenv("SLURM_NTASKS", "3")
    with pytest.raises(cluster.SSLabError, match="same number of tasks"):
        cluster.adapt_trainer_kwargs({})


class SignalAt(pl.Callback):
    """Sends this process ``signum`` at the end of training step ``step`` (what SLURM's --signal does)."""

    def __init__(self, step: int, signum: str = "SIGUSR1") -> None:
        self.step, self.signum = step, getattr(signal, signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.slow
@pytest.mark.parametrize("signum", ["SIGUSR1", "SIGTERM"])
def test_signal_outside_slurm_checkpoints_at_the_step_and_stops(tiny_cfg, tmp_path, signum):
    from sslab.callbacks.preemption import Preempted
    from sslab.runs.training import train

    cfg = tiny_cfg(
        "trainer.max_steps=50",
        "checkpoint.every_n_steps=0",
        f"+callbacks.signal={{_target_: tests.test_slurm.SignalAt, step: 2, signum: {signum}}}",
    )
    with pytest.raises(Preempted, match=f"{signum} at step 2: wrote .*last.ckpt; not a SLURM job") as e:
        train(cfg)
    assert not e.value.requeued
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 2
    assert signal.getsignal(getattr(signal, signum)) in (signal.SIG_DFL, signal.default_int_handler)


@pytest.mark.slow
def test_local_sweep_run_carries_wandb_group_job_type_and_tags(tmp_path):
    """What the dashboard groups by, read back from the offline run file that `wandb sync` uploads."""
    tiny = [o for o in TINY if not o.startswith("logger=")]
    cmd = [sys.executable, "train.py", "-m", "seed=3", *tiny, "logger=[wandb]", "trainer.max_steps=2"]
    cmd += ["data.eval_bank_size=40", "data.eval_test_size=20", f"paths.output_dir={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    (sweep_dir,) = tmp_path.glob("multirun/*/*")
    (run_file,) = (sweep_dir / "0").glob("wandb/offline-run-*/run-*.wandb")
    run = next(r.run for r in records(run_file) if r.WhichOneof("record_type") == "run")
    assert run.run_group == str(sweep_dir)
    assert run.job_type == "dino"
    assert "seed=3" in run.tags and "trainer.max_steps=2" in run.tags
