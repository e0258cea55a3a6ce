"""Where the run is: SLURM job detection, the DDP rendezvous address, trainer settings from the allocation,
requeueing, and the checkpoint a requeued job must continue from.

Everything SLURM tells a job comes from its environment (``SLURM_JOB_ID``, ``SLURM_NTASKS``, ``SLURM_NNODES``,
``SLURM_PROCID``, ``SLURM_RESTART_COUNT``, ``SLURM_JOB_NODELIST``); Lightning's ``SLURMEnvironment`` reads the
ranks from it. What is left to us: an address of the first node that the other nodes can reach (node names
need not resolve; SLURM's own ``NodeAddr`` always works), the number of nodes and tasks per node for the
Trainer, and finding our own checkpoint after a requeue.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sslab.errors import SSLabError

LAST = "last.ckpt"


def env_int(name: str, default: int = 0) -> int:
    value = os.environ.get(name, "")
    m = re.match(r"\d+", value)
    return int(m.group()) if m else default


def in_slurm_job() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID"))


def slurm_tasks() -> int:
    """Tasks in this job step (one per training process); 0 outside ``srun``/SLURM."""
    return env_int("SLURM_NTASKS") if in_slurm_job() else 0


def restart_count() -> int:
    """How many times SLURM has requeued this job (0 on the first run)."""
    return env_int("SLURM_RESTART_COUNT")


def expand_nodelist(nodelist: str) -> list[str]:
    """``"gpu[01-02,05],cpu7"`` -> ``["gpu01", "gpu02", "gpu05", "cpu7"]`` (SLURM's hostlist syntax, zero
    padding kept)."""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            hosts += [f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi or lo) + 1)]
    return hosts


def node_address(host: str) -> str:
    """An address for ``host``: its DNS name when that resolves, else the ``NodeAddr`` SLURM uses for it."""
    try:
        socket.getaddrinfo(host, None)
        return host
    except OSError:
        pass
    try:
        out = subprocess.run(
            ["scontrol", "show", "node", host, "-o"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise SSLabError(
            f"node {host} does not resolve and `scontrol show node` failed ({e}); export MASTER_ADDR yourself"
        ) from e
    m = re.search(r"\bNodeAddr=(\S+)", out)
    if not m:
        raise SSLabError(f"node {host} does not resolve and SLURM reports no NodeAddr; export MASTER_ADDR")
    return m.group(1)


def setup_rendezvous() -> None:
    """Inside a multi-task SLURM step, set MASTER_ADDR (first node of the job) and MASTER_PORT (from the job
    id, so every task computes the same one and a requeued job reuses it) unless the user set them."""
    if slurm_tasks() <= 1:
        return
    if not os.environ.get("MASTER_ADDR"):
        hosts = expand_nodelist(os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", ""))
        os.environ["MASTER_ADDR"] = node_address(hosts[0]) if hosts else "127.0.0.1"
    if not os.environ.get("MASTER_PORT"):
        os.environ["MASTER_PORT"] = str(20000 + env_int("SLURM_JOB_ID") % 20000)


def adapt_trainer_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Trainer settings that follow from the allocation and the strategy name.

    - Under ``srun`` with several tasks: one process per task, ``num_nodes`` = nodes of the job, ``devices`` =
      tasks per node, and DDP unless a strategy is set.
    - ``strategy=ddp`` becomes DDP with ``static_graph=True``: parameters a method never uses (the backbone's
      mask token under DINO) are found once in the first step instead of failing the reduction, at no
      per-step cost. A method whose set of used parameters changes from step to step needs
      ``trainer.strategy=ddp_find_unused_parameters_true``.
    """
    out = dict(kwargs)
    if out.get("sync_batchnorm") == "auto":  # SyncBatchNorm exists on GPUs only
        out["sync_batchnorm"] = out.get("accelerator", "auto") in ("auto", "gpu", "cuda") and (
            torch.cuda.is_available()
        )
    tasks = slurm_tasks()
    if tasks > 1:
        nodes = max(1, env_int("SLURM_NNODES", env_int("SLURM_JOB_NUM_NODES", 1)))
        if tasks % nodes:
            raise SSLabError(
                f"SLURM gave {tasks} tasks on {nodes} nodes; use the same number of tasks on every node"
            )
        out.update(num_nodes=nodes, devices=tasks // nodes)
        if out.get("strategy", "auto") == "auto":
            out["strategy"] = "ddp"
    if out.get("strategy") == "ddp":
        from pytorch_lightning.strategies import DDPStrategy

        out["strategy"] = DDPStrategy(static_graph=True)
    elif out.get("strategy") == "fsdp":
        out["strategy"] = fsdp_strategy()
    return out


def fsdp_strategy() -> Any:
    """FSDP with one unit per transformer block (timm ``Block``), original parameters kept visible so the
    two weight-decay groups and the EMA teacher see per-parameter tensors. CUDA only."""
    if not torch.cuda.is_available():
        raise SSLabError("trainer=fsdp shards over CUDA GPUs and none is visible; on CPUs use trainer=ddp")
    from pytorch_lightning.strategies import FSDPStrategy
    from timm.models.vision_transformer import Block

    return FSDPStrategy(auto_wrap_policy={Block}, use_orig_params=True)


def slurm_plugins() -> list[Any]:
    """Lightning's SLURM environment without its own requeue handler: ``Preemption`` requeues at a step
    boundary instead (Lightning's saves from inside the signal handler, mid-step, which is not exact)."""
    from lightning_fabric.plugins.environments import SLURMEnvironment

    if slurm_tasks() >= 1 and SLURMEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=False)]
    return []


def job_id() -> str | None:
    """This job's id for ``scontrol``: ``<array job>_<task>`` for an array task (a sweep), because the bare
    ``SLURM_JOB_ID`` of one task can equal the array's id, which names every task of the array."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def requeue() -> tuple[bool, str]:
    """``scontrol requeue`` this job (only this task of an array). Returns (done, what happened)."""
    job = job_id()
    if not job:
        return False, "not a SLURM job, nothing to requeue"
    try:
        res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"scontrol requeue {job} failed: {e}"
    if res.returncode != 0:
        return False, f"scontrol requeue {job} failed: {(res.stderr or res.stdout).strip()}"
    return True, f"requeued SLURM job {job}"


def own_checkpoint(run_dir: Path) -> Path | None:
    """A requeued job continues from its own run's ``checkpoints/last.ckpt`` (the hydra-submitit launcher
    gives a requeued job the same run directory), never from another run's, whatever ``resume`` says."""
    path = Path(run_dir) / "checkpoints" / LAST
    return path if restart_count() > 0 and path.is_file() else None


BATCHNORM_STATS = ("running_mean", "running_var", "num_batches_tracked")


@torch.no_grad()
def state_digest(module: torch.nn.Module) -> bytes:
    """A hash of every parameter and buffer, bit for bit, except BatchNorm running statistics: without
    SyncBatchNorm (which torch has only on GPUs) each rank keeps its own, and training never reads them."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        if name.rsplit(".", 1)[-1] in BATCHNORM_STATS:
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()


def ranks_in_sync(module: torch.nn.Module) -> bool:
    """True when every rank holds bit-identical parameters and buffers (DDP keeps parameters equal; a buffer
    such as a center that is not all-reduced drifts apart and shows up here). True on one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return True
    digests: list[bytes | None] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, state_digest(module))
    return all(d == digests[0] for d in digests)
