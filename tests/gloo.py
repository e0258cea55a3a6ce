"""Run a short script as ranks 0 and 1 of a real 2-process gloo group (no mocks) and collect their results."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from tests.conftest import ROOT

# Every rank script starts from this (argv = rank, port, path of the shared inputs) and ends with DONE.
PREAMBLE = """
import sys, torch, torch.distributed as dist
rank, port, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
"""


# os._exit after the group is gone: gloo's background threads can abort interpreter teardown ("terminate
# called without an active exception", seen under load) after every result is saved; that is not a result.
DONE = """
dist.barrier()
dist.destroy_process_group()
import os
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)
"""


def run_two_ranks(script: str, path: Path) -> list[Any]:
    """Run PREAMBLE + ``script`` on 2 processes; each must ``torch.save(..., f"{path}.{rank}")``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PREAMBLE + script + DONE, str(r), port, str(path)],
            env=env,
            stderr=subprocess.PIPE,
        )
        for r in (0, 1)
    ]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read().decode()[-2000:]
    return [torch.load(f"{path}.{r}") for r in (0, 1)]
