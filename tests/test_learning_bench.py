"""Smoke test of ``bench/learning.py`` (``make learning``): the whole tool end to end at a toy size.

Runs it as a user does, in a subprocess: DINO and MAE through ``train.py`` (3 steps each), their lightly
twins, random init and raw pixels, with ``--tiny`` (one ViT block, a 200 / 100 evaluation split, batch 16) on
the embedded data and one thread. About 60 s on 2 CPU cores. It checks that the tool works and reports every
row with finite numbers, not that anything learns in 3 steps (that is the full measurement's job).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_learning_bench_writes_the_table(tmp_path):
    out = tmp_path / "learning"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "learning.py"),
        "--methods",
        "dino,mae",
        "--steps",
        "3",
        "--source",
        "embedded",
        "--tiny",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "| raw pixels" in res.stdout and "wall time of the whole run" in res.stdout

    result = json.loads((out / "learning.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["random init", "raw pixels", "dino", "mae"]
    assert result["errors"] == []

    def finite(x) -> bool:
        return isinstance(x, (int, float)) and math.isfinite(x)

    for name in ("random init", "raw pixels"):
        for metric in ("knn", "linear"):
            assert finite(rows[name]["sslab"][metric]["mean"]), (name, metric)
    for name in ("dino", "mae"):
        for side in ("sslab", "lightly"):
            for metric in ("knn", "linear", "images_per_s"):
                value = rows[name][side][metric]["mean"]
                assert finite(value) and value > 0, (name, side, metric, value)
            assert rows[name][side]["steps"]["mean"] == 3, (name, side)
        assert finite(rows[name]["sslab"]["random_init_knn"]["mean"])
    assert (out / "learning.png").stat().st_size > 0

    # --combine reads seeds run apart back into one table: the same file twice is two equal seeds
    combined = tmp_path / "combined"
    again = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "learning.py"),
            "--combine",
            str(out / "learning.json"),
            str(out / "learning.json"),
            "--out",
            str(combined),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    both = json.loads((combined / "learning.json").read_text())
    assert both["seeds"] == result["seeds"] * 2
    for name, row in ((r["name"], r) for r in both["rows"]):
        knn = row["sslab"]["knn"]
        assert knn["values"] == rows[name]["sslab"]["knn"]["values"] * 2, name
        assert knn["mean"] == pytest.approx(rows[name]["sslab"]["knn"]["mean"]) and knn["spread"] == 0, name
    assert "±" in again.stdout  # two seeds: the table shows the spread
