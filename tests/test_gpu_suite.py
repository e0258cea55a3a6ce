"""The prepared GPU suite and the cost model run end to end on a CPU at toy sizes (no speed is asserted):
the next session with a GPU must find them working, not discover an import error on its clock."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def row_names() -> list[str]:
    """``ROWS`` of bench/gpu_suite.py, read without importing it (bench/ is not a package)."""
    tree = ast.parse((ROOT / "bench" / "gpu_suite.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "ROWS" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError("bench/gpu_suite.py defines no ROWS")


def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_gpu_suite_runs_every_row_on_cpu_tiny():
    proc = run(["bash", "bench/gpu_suite.sh", "--device", "cpu", "--tiny", "--threads", "1"], timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    names = row_names()
    assert len(names) == 8
    for name in names:
        assert any(line.startswith(f"| {name} ") for line in table), f"row {name!r} missing:\n{proc.stdout}"
    assert not any("| error:" in line or "| skipped:" in line for line in table), proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].startswith('{"bench": "gpu_suite"')


@pytest.mark.slow
def test_cost_model_runs_on_cpu_tiny():
    proc = run([sys.executable, "bench/cost_model.py", "--device", "cpu", "--tiny", "--threads", "1"], 300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    assert "fit: ms/step = " in proc.stdout
    assert "| batch | crops (px)" in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].startswith('{"bench": "cost_model"')
