"""Find the checkpoint that ``resume=auto`` or ``resume=PATH`` refers to."""

from __future__ import annotations

from pathlib import Path

from sslab.errors import SSLabError

LAST = "last.ckpt"


def find_resume_checkpoint(
    resume: str | None, output_dir: str | Path, current_run: Path | None = None
) -> Path | None:
    """``auto``: the most recently written ``checkpoints/last.ckpt`` under ``output_dir`` (other than the current
    run's); a path: that file, or ``<dir>/checkpoints/last.ckpt`` when given a run directory."""
    if resume in (None, "", "null", False):
        return None
    if str(resume) == "auto":
        candidates = [
            p
            for p in Path(output_dir).glob(f"**/checkpoints/{LAST}")
            if current_run is None or current_run not in p.parents
        ]
        if not candidates:
            raise SSLabError(
                f"resume=auto found no checkpoints/{LAST} under {output_dir}; run once without resume first"
            )
        return max(candidates, key=lambda p: p.stat().st_mtime)
    path = Path(str(resume)).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / LAST
    if not path.is_file():
        raise SSLabError(
            f"resume={resume}: no checkpoint file at {path}; pass a .ckpt file or a run directory"
        )
    return path
