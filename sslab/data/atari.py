"""Atari observations for self-supervised pretraining (TOV-VICReg, VICReg) and RAM-state probing.

An observation o_t is the stack of the last 3 preprocessed frames (channels), DQN-style; at the start of an
episode the first frame is repeated. Training items are triplets (o_{t-gap}, o_t, o_{t+gap}) whose three
stacks all lie inside one episode (``frames`` uint8 (3, 3, H, W), time order), with ``image`` = o_t,
``label`` = the game's index in ``games`` (what the generic k-NN / linear callbacks classify) and ``index``.

Two collections per game, from different seeds: the pretraining one (``frames_per_game`` steps, seed
``collect_seed``) and the probe one (``probe_frames_per_game`` steps, seed ``collect_seed + 1``), whose
episodes are split into probe-train and probe-test. The probe never sees pretraining episodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from sslab.data.atari_games import check_game
from sslab.data.base import SSLDataModule
from sslab.dataset_builders.atari_frames import CollectSpec, load_or_collect
from sslab.errors import SSLabError


def stack_indices(episode: np.ndarray, stack: int) -> np.ndarray:
    """(N, stack) row indices of the frames forming each observation: the ``stack`` latest frames of the same
    episode, oldest first, with the episode's first frame repeated before its start."""
    n = len(episode)
    idx = np.arange(n)[:, None] - np.arange(stack - 1, -1, -1)[None, :]
    first = np.r_[0, np.flatnonzero(episode[1:] != episode[:-1]) + 1]
    start = first[np.searchsorted(first, np.arange(n), side="right") - 1]
    return np.maximum(idx, start[:, None])


def triplet_centres(episode: np.ndarray, gap: int) -> np.ndarray:
    """Indices t such that t - gap and t + gap lie in the same episode as t (rows sorted by time)."""
    if gap < 1:
        raise SSLabError(f"data.gap={gap}: the temporal gap must be >= 1 step")
    n = len(episode)
    t = np.arange(gap, n - gap)
    return t[(episode[t - gap] == episode[t]) & (episode[t + gap] == episode[t])]


@dataclass
class Collection:
    """One game's collected rows, with the stacked-observation index built once."""

    frames: np.ndarray  # (N, H, W) uint8 single frames
    ram: np.ndarray  # (N, 128) uint8
    episode: np.ndarray  # (N,) int
    stacks: np.ndarray  # (N, stack) frame rows of each observation

    def observations(self, rows: np.ndarray) -> np.ndarray:
        return self.frames[self.stacks[rows]]  # (n, stack, H, W)


class AtariObservations(Dataset):
    """Observations of chosen rows across games, for evaluation: {"image", "label", "index"}."""

    def __init__(self, parts: list[tuple[Collection, np.ndarray, int]]) -> None:
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(rows) for _, rows, _ in parts])
        self.labels = np.concatenate([np.full(len(rows), g, np.int64) for _, rows, g in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, i: int) -> tuple[Collection, int, int]:
        p = int(np.searchsorted(self.offsets, i, side="right") - 1)
        col, rows, game = self.parts[p]
        return col, int(rows[i - self.offsets[p]]), game

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        col, row, game = self.locate(i)
        image = torch.from_numpy(col.frames[col.stacks[row]])
        return {"image": image, "label": torch.tensor(game), "index": torch.tensor(i)}


class AtariTriplets(AtariObservations):
    """Training items: the observation o_t plus ``frames`` = (o_{t-gap}, o_t, o_{t+gap}) in one episode."""

    def __init__(self, parts: list[tuple[Collection, np.ndarray, int]], gap: int) -> None:
        super().__init__(parts)
        self.gap = gap

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        col, row, game = self.locate(i)
        rows = np.array([row - self.gap, row, row + self.gap])
        frames = torch.from_numpy(col.observations(rows))  # (3, stack, H, W)
        return {"image": frames[1], "frames": frames, "label": torch.tensor(game), "index": torch.tensor(i)}


def split_episodes(episode: np.ndarray, train_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a deterministic random train / test split by whole episodes (at least one episode each)."""
    ids = np.unique(episode)
    if len(ids) < 2:
        raise SSLabError(
            f"the probe collection has {len(ids)} episode(s); raise data.probe_frames_per_game or lower "
            "data.max_episode_steps so that held-out episodes exist"
        )
    ids = np.random.default_rng(seed).permutation(ids)
    n_train = min(max(1, round(train_fraction * len(ids))), len(ids) - 1)
    train = np.isin(episode, ids[:n_train])
    return np.flatnonzero(train), np.flatnonzero(~train)


class AtariDataModule(SSLDataModule):
    """Atari games collected offline with gymnasium + ale-py (ROMs ship in the ale-py wheel)."""

    provides = ("image", "label", "index", "frames")

    def __init__(
        self,
        games: list[str],
        frames_per_game: int = 3000,
        probe_frames_per_game: int = 2000,
        probe_train_fraction: float = 0.8,
        gap: int = 3,
        stack: int = 3,
        frame_skip: int = 4,
        sticky_prob: float = 0.25,
        max_episode_steps: int = 500,
        obs_size: int = 84,
        policy: str = "random",
        collect_seed: int = 0,
        cache_dir: str = "~/.cache/sslab/atari",
        shard_size: int = 5000,
        progress: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not games:
            raise SSLabError("data.games is empty; name at least one game, e.g. data.games=[Pong]")
        self.games = [check_game(g) for g in games]
        if self.image_size > obs_size:
            raise SSLabError(
                f"data.image_size={self.image_size} exceeds data.obs_size={obs_size}; crops must fit"
            )
        if kwargs.get("channels", stack) != stack:
            raise SSLabError(
                f"data.channels={kwargs['channels']} must equal data.stack={stack} (stacked frames)"
            )
        self.frames_per_game, self.probe_frames_per_game = frames_per_game, probe_frames_per_game
        self.probe_train_fraction = probe_train_fraction
        self.gap, self.stack = gap, stack
        self.collect_kwargs = dict(
            frame_skip=frame_skip,
            sticky_prob=sticky_prob,
            max_episode_steps=max_episode_steps,
            size=obs_size,
            policy=policy,
        )
        self.collect_seed = collect_seed
        self.cache_dir, self.shard_size, self.progress = cache_dir, shard_size, progress
        self.class_names = list(self.games)
        self.pretrain: dict[str, Collection] = {}
        self.probe: dict[str, tuple[Collection, np.ndarray, np.ndarray]] = {}

    def _specs(self, num_steps: int, seed: int) -> list[CollectSpec]:
        return [CollectSpec(g, num_steps, seed, **self.collect_kwargs) for g in self.games]

    def _load(self) -> None:
        if self.pretrain:
            return
        specs = self._specs(self.frames_per_game, self.collect_seed)
        probe_specs = self._specs(self.probe_frames_per_game, self.collect_seed + 1)
        for spec, data in load_or_collect(
            specs + probe_specs, self.cache_dir, self.shard_size, self.progress
        ):
            col = Collection(
                data["frames"], data["ram"], data["episode"], stack_indices(data["episode"], self.stack)
            )
            if spec.seed == self.collect_seed:
                self.pretrain[spec.game] = col
            else:
                tr, te = split_episodes(data["episode"], self.probe_train_fraction, self.collect_seed + 1)
                self.probe[spec.game] = (col, tr, te)

    def load_splits(self):
        self._load()
        parts = []
        for g, game in enumerate(self.games):
            centres = triplet_centres(self.pretrain[game].episode, self.gap)
            if len(centres) == 0:
                raise SSLabError(
                    f"{game}: no triplets with data.gap={self.gap}; lower it or collect more frames"
                )
            parts.append((self.pretrain[game], centres, g))
        train = AtariTriplets(parts, self.gap)
        test = AtariObservations(
            [(self.probe[game][0], self.probe[game][2], g) for g, game in enumerate(self.games)]
        )
        return train, train.labels, test, test.labels

    def probe_split(self, game: str) -> dict[str, np.ndarray]:
        """Held-out probe episodes of one game: observations (n, stack, H, W) uint8 and RAM (n, 128) of the
        probe-train and probe-test episodes."""
        self._load()
        col, tr, te = self.probe[game]
        return {
            "train_obs": col.observations(tr),
            "train_ram": col.ram[tr],
            "test_obs": col.observations(te),
            "test_ram": col.ram[te],
        }
