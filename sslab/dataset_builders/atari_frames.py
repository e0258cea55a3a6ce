"""Collect preprocessed Atari observations and RAM with gymnasium + ale-py, cached on disk as shards.

Preprocessing follows DQN (Mnih et al., Nature 2015) as packaged in gymnasium's ``AtariPreprocessing``:
each agent step repeats the action for ``frame_skip`` emulator frames, takes the pixel-wise max of the last two
greyscale screens (sprite flicker), and area-resamples 210x160 to ``size`` x ``size``. Sticky actions
(Machado et al., 2018: the emulator repeats the previous action with probability 0.25) come from the ALE.
Single processed frames are stored; the stack of the last 3 frames is built when reading (see ``atari.py``).

A collection is a pure function of its ``CollectSpec`` (seeded emulator and policy), so its cache key is a hash
of the spec. Shards are ``np.savez_compressed`` files written atomically; ``meta.json`` is written last and
marks a complete collection.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sslab.data.atari_games import env_id
from sslab.errors import SSLabError

RAW_SHAPE = (210, 160)


@dataclass(frozen=True)
class CollectSpec:
    """Everything that determines a collection's content."""

    game: str
    num_steps: int
    seed: int
    frame_skip: int = 4
    sticky_prob: float = 0.25
    size: int = 84
    max_episode_steps: int = 500
    policy: str = "random"

    def key(self) -> str:
        import ale_py

        text = json.dumps({**dataclasses.asdict(self), "ale_py": ale_py.__version__}, sort_keys=True)
        return f"{self.game}-{self.num_steps}-s{self.seed}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def area_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of exact area resampling: output pixel j averages input interval
    [j * in/out, (j+1) * in/out) with fractional overlap weights (what OpenCV's INTER_AREA does when shrinking)."""
    scale = in_size / out_size
    lo = np.arange(out_size)[:, None] * scale
    hi = lo + scale
    left = np.arange(in_size)[None, :]
    overlap = np.clip(np.minimum(hi, left + 1) - np.maximum(lo, left), 0.0, None)
    return (overlap / scale).astype(np.float32)


class Resizer:
    """210x160 uint8 screen -> size x size uint8 by two small matrix products (separable area resampling)."""

    def __init__(self, size: int, in_shape: tuple[int, int] = RAW_SHAPE) -> None:
        self.rows = area_matrix(in_shape[0], size)
        self.cols_t = area_matrix(in_shape[1], size).T.copy()

    def __call__(self, screen: np.ndarray) -> np.ndarray:
        out = self.rows @ screen.astype(np.float32) @ self.cols_t
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _game_seed(seed: int, game: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(game.encode())) % (2**31)


def make_env(spec: CollectSpec):
    """The ALE env with the emulator's own frame skip off (we skip and max-pool ourselves) and sticky actions."""
    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)
    env = gym.make(
        env_id(spec.game),
        frameskip=1,
        repeat_action_probability=spec.sticky_prob,
        obs_type="grayscale",
        full_action_space=False,
    )
    env.reset(seed=_game_seed(spec.seed, spec.game))
    return env


def collect(spec: CollectSpec, progress=None) -> dict[str, np.ndarray]:
    """Run the policy for ``spec.num_steps`` agent steps. Returns ``frames`` (N, size, size) uint8, ``ram``
    (N, 128) uint8 read after each step, ``episode`` (N,) int32, ``step`` (N,) int32 within the episode,
    ``action`` (N,) uint8 and ``reward`` (N,) float32. An episode ends at game over or ``max_episode_steps``.

    The observation of step 0 of an episode is the screen after reset; RAM rows match their observation.
    """
    if spec.policy != "random":
        raise SSLabError(f"data.policy={spec.policy!r} is unknown; use random")
    if spec.num_steps < 1 or spec.frame_skip < 1:
        raise SSLabError("Atari collection needs num_steps >= 1 and frame_skip >= 1")
    env = make_env(spec)
    ale = env.unwrapped.ale
    actions = ale.getMinimalActionSet()
    rng = np.random.default_rng(_game_seed(spec.seed, spec.game) + 1)
    resize = Resizer(spec.size)
    n = spec.num_steps
    out = {
        "frames": np.empty((n, spec.size, spec.size), np.uint8),
        "ram": np.empty((n, 128), np.uint8),
        "episode": np.empty(n, np.int32),
        "step": np.empty(n, np.int32),
        "action": np.zeros(n, np.uint8),
        "reward": np.zeros(n, np.float32),
    }
    screens = np.empty((2, *RAW_SHAPE), np.uint8)
    episode, t = 0, 0
    ale.getScreenGrayscale(screens[1])
    out["frames"][0], out["ram"][0] = resize(screens[1]), ale.getRAM()
    out["episode"][0], out["step"][0] = 0, 0
    for i in range(1, n):
        if ale.game_over() or t + 1 >= spec.max_episode_steps:
            ale.reset_game()
            episode, t = episode + 1, 0
            ale.getScreenGrayscale(screens[1])
            frame = resize(screens[1])
        else:
            a = int(rng.integers(len(actions)))
            reward = 0.0
            last = spec.frame_skip - 1
            for k in range(spec.frame_skip):
                reward += ale.act(actions[a])
                done = ale.game_over()
                if k >= last - 1 or done:  # the last two screens of the skip; the final one in slot 1
                    ale.getScreenGrayscale(screens[1 if (k == last or done) else 0])
                if done:
                    break
            if k < last or last == 0:  # only one screen of this step was seen: no max-pooling
                screens[0] = screens[1]
            frame = resize(np.maximum(screens[0], screens[1]))
            out["action"][i], out["reward"][i] = a, reward
            t += 1
        out["frames"][i], out["ram"][i] = frame, ale.getRAM()
        out["episode"][i], out["step"][i] = episode, t
        if progress is not None and i % 250 == 0:
            progress(250)
    env.close()
    return out


# -- cache ---------------------------------------------------------------------------------------------
def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)


def write_shards(directory: Path, data: dict[str, np.ndarray], shard_size: int, meta: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    n = len(data["frames"])
    for s, start in enumerate(range(0, n, shard_size)):
        _atomic_savez(
            directory / f"shard_{s:05d}.npz", **{k: v[start : start + shard_size] for k, v in data.items()}
        )
    tmp = directory / f".meta.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({**meta, "num_shards": -(-n // shard_size)}, indent=2))
    os.replace(tmp, directory / "meta.json")


def read_shards(directory: Path) -> dict[str, np.ndarray]:
    meta = json.loads((directory / "meta.json").read_text())
    parts: dict[str, list[np.ndarray]] = {}
    for s in range(meta["num_shards"]):
        with np.load(directory / f"shard_{s:05d}.npz") as z:
            for k in z.files:
                parts.setdefault(k, []).append(z[k])
    return {k: np.concatenate(v) for k, v in parts.items()}


def load_or_collect(
    specs: list[CollectSpec], cache_dir: str | Path, shard_size: int = 5000, show_progress: bool = True
) -> Iterator[tuple[CollectSpec, dict[str, np.ndarray]]]:
    """Yield (spec, arrays) for each spec, reading its cached shards or collecting (with a progress bar) and
    caching them first. Throughput of fresh collections is printed."""
    root = Path(cache_dir).expanduser()
    todo = [s for s in specs if not (root / s.key() / "meta.json").is_file()]
    collected: dict[CollectSpec, dict[str, np.ndarray]] = {}
    if todo:
        collected = _collect_all(todo, root, shard_size, show_progress)
    for spec in specs:
        yield spec, collected.pop(spec, None) or read_shards(root / spec.key())


def _collect_all(
    todo: list[CollectSpec], root: Path, shard_size: int, show_progress: bool
) -> dict[CollectSpec, dict[str, np.ndarray]]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SSLabError(
            f"data.cache_dir={root} cannot be created ({e}); set data.cache_dir to a writable path"
        ) from e
    out = {}
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, disable=not show_progress, transient=False) as bar:
        for spec in todo:
            task = bar.add_task(f"collecting {spec.game} (seed {spec.seed})", total=spec.num_steps)
            start = time.perf_counter()
            data = collect(spec, progress=lambda k, task=task: bar.advance(task, k))
            elapsed = time.perf_counter() - start
            bar.update(task, completed=spec.num_steps)
            write_shards(
                root / spec.key(),
                data,
                shard_size,
                {**dataclasses.asdict(spec), "collect_seconds": round(elapsed, 3)},
            )
            print(
                f"collected {spec.num_steps} {spec.game} frames in {elapsed:.1f} s ({spec.num_steps / elapsed:.0f} frames/s)"
            )
            out[spec] = data
    return out
