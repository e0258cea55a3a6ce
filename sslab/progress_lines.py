"""Start, periodic and end lines for the long phases outside the training loop (evaluation, baselines,
fine-tuning, probes, MaskCut), so that no phase sits silent for minutes.

On a terminal a rich bar shows the count and the remaining time; when stdout is not a terminal (SLURM job
logs, ``nohup``, a pipe) the bar would print only at exit, so plain flushed lines are printed instead::

    k-NN bank features: 40 batches
    k-NN bank features: 12/40 batches (30%), 31s elapsed, eta 1m12s
    k-NN bank features: done in 1m43s

A periodic line comes every ``SSLAB_PROGRESS_SECONDS`` seconds (default 30). Only the first process of a
multi-process run prints. No torch or Lightning imports: every floor may use it.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import TypeVar

T = TypeVar("T")
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "NODE_RANK")
_live = False  # a rich bar is on screen: nested phases print lines only (rich allows one live display)


def every_seconds() -> float:
    """Seconds between periodic lines: ``SSLAB_PROGRESS_SECONDS`` (tests set 0: a line per item), else 30."""
    try:
        return max(0.0, float(os.environ.get("SSLAB_PROGRESS_SECONDS", "30")))
    except ValueError:
        return 30.0


def format_duration(seconds: float) -> str:
    """4m10s, 1h02m, 12s: short enough for a log line."""
    if not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def is_rank_zero() -> bool:
    """The first process of a (multi-process, multi-node) run, by the launchers' rank variables."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name, "0")
        if value.isdigit() and int(value) > 0:
            return False
    return True


def say(line: str) -> None:
    """One flushed line on stdout (first process only)."""
    if is_rank_zero():
        print(line, flush=True)


class Phase:
    """A named phase of ``total`` ``unit`` (or of unknown length): a start line, progress, an end line.

    ``with Phase("linear probe", 100, "epochs") as p: ... p.advance()``; ``p.elapsed`` is its duration.
    """

    def __init__(
        self,
        name: str,
        total: int | None = None,
        unit: str = "steps",
        plain: bool | None = None,
        interval: float | None = None,
    ) -> None:
        self.name, self.total, self.unit = name, total, unit
        self.plain = (not sys.stdout.isatty()) if plain is None else plain
        self.interval = every_seconds() if interval is None else interval
        self.done = 0
        self.start = self.last = 0.0
        self.elapsed = 0.0
        self._bar = None
        self._task = None

    def __enter__(self) -> Phase:
        global _live
        self.start = self.last = time.perf_counter()
        size = f": {self.total} {self.unit}" if self.total else ""
        say(f"{self.name}{size}")
        if not self.plain and self.total and not _live and is_rank_zero():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn(f"  {self.name}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.name, total=self.total)
            _live = True
        return self

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
            return
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            say(self.status(now - self.start))

    def wrap(self, items: Iterable[T]) -> Iterator[T]:
        """Iterate ``items``, advancing this phase by one per item (several loaders can feed one phase)."""
        for item in items:
            yield item
            self.advance()

    def note(self, text: str) -> None:
        """A line of news (an epoch's loss) under the phase's name, above the bar on a terminal."""
        if self._bar is not None:
            self._bar.console.print(f"{self.name}: {text}")
        else:
            say(f"{self.name}: {text}")

    def status(self, elapsed: float) -> str:
        """``name: 12/40 batches (30%), 31s elapsed, eta 1m12s`` (no ETA without a total)."""
        if not self.total:
            return f"{self.name}: {self.done} {self.unit}, {format_duration(elapsed)} elapsed"
        left = (self.total - self.done) * elapsed / self.done if self.done else math.inf
        percent = 100 * self.done / self.total
        return (
            f"{self.name}: {self.done}/{self.total} {self.unit} ({percent:.0f}%), "
            f"{format_duration(elapsed)} elapsed, eta {format_duration(left)}"
        )

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        global _live
        self.elapsed = time.perf_counter() - self.start
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
            _live = False
        if kind is None:
            say(f"{self.name}: done in {format_duration(self.elapsed)}")


def track(
    items: Iterable[T], name: str, total: int | None = None, unit: str = "batches", **kwargs: object
) -> Iterator[T]:
    """Iterate ``items`` inside a ``Phase`` (``total`` defaults to ``len(items)`` when it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Phase(name, total, unit, **kwargs) as phase:  # type: ignore[arg-type]
        yield from phase.wrap(items)
