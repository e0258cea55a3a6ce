"""Smoke test of ``bench/dino_step.py``: the tool end to end at a toy size, ``--compile`` included.

Runs it as a user does, in a subprocess, on the embedded data with one ViT block, batch 4 and one timed
repetition, and reads its JSON line back. It checks that every side ran and that the figures are finite
and positive, not how fast anything is (speed is the full benchmark's job, on an idle machine).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from sslab.precision import compile_unavailable_reason
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.skipif(compile_unavailable_reason("cpu") is not None, reason="torch.compile cannot run here")
def test_dino_step_bench_times_every_side_and_compile(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "dino_step.py"),
        "--batch-size",
        "4",
        "--reps",
        "1",
        "--warmup",
        "0",
        "--threads",
        "1",
        "--override",
        "++backbone.depth=1",
        "--compile",
    ]
    # a fresh Inductor cache, so the compile time is measured and not read back from an earlier run
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "| sslab compile=true, with views" in res.stdout
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["bench"] == "dino_step" and result["backbone"] == "vit_t (1 blocks)"
    for key in (
        "images_per_s_sslab_with_views",
        "images_per_s_lightly_with_views",
        "images_per_s_sslab_model_only",
        "speedup_compile_with_views",
        "speedup_compile_model_only",
    ):
        assert math.isfinite(result[key]) and result[key] > 0, (key, result[key])
    assert result["compile_s"] > 0  # a cold cache: the first pair of steps compiles
