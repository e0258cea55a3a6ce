"""Progress in a job log: with stdout not a terminal, a real ``python train.py`` prints plain periodic lines
(step, loss, images/s, eta) while it trains, not only when it exits."""

import re
import subprocess
import sys

import pytest

from sslab.callbacks.progress import PlainProgress, format_duration, progress_bar
from tests.conftest import ROOT, TINY

LINE = re.compile(r"^step (\d+)/6  loss [-+.\deE]+  \d+ img/s  eta \d+(?:s|m\d\ds)$")


def test_format_duration():
    assert [format_duration(s) for s in (0.4, 12, 250, 3725)] == ["0s", "12s", "4m10s", "1h02m"]


def test_plain_lines_when_stdout_is_not_a_terminal(monkeypatch):
    from pytorch_lightning.callbacks import RichProgressBar

    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    assert isinstance(progress_bar(), PlainProgress)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert isinstance(progress_bar(), RichProgressBar)
    assert isinstance(progress_bar(plain=True), PlainProgress)


@pytest.mark.slow
def test_piped_train_prints_periodic_step_lines_while_training(tmp_path):
    overrides = [o for o in TINY if not o.startswith(("callbacks=", "trainer.enable_progress_bar"))]
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        *overrides,
        "callbacks=[knn,progress]",
        "trainer.enable_progress_bar=true",
        "callbacks.progress.every_n_steps=2",
        "trainer.max_steps=6",
        f"paths.output_dir={tmp_path}",
    ]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines, running_at_first_step = [], None
    try:
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            lines.append(line)
            if running_at_first_step is None and LINE.match(line):
                running_at_first_step = proc.poll() is None
        assert proc.wait(timeout=600) == 0, "\n".join(lines)
    finally:
        proc.kill()
    steps = [int(m.group(1)) for m in map(LINE.match, lines) if m]
    assert steps == [2, 4, 6], "\n".join(lines)
    assert running_at_first_step, "the first step line arrived only after the run had exited"
    done = next(i for i, line in enumerate(lines) if line.startswith("trained to step 6 in "))
    last_step_line = max(i for i, line in enumerate(lines) if LINE.match(line))
    assert last_step_line < done < len(lines) - 1  # the run's end-of-training output comes after them
    assert not any("\x1b[" in line for line in lines)  # no terminal escape codes in a log
