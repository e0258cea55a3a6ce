"""Supported Atari games and where their state lives in the console's 128-byte RAM.

The addresses are AtariARI's published annotations (Anand et al., "Unsupervised State Representation Learning
in Atari", NeurIPS 2019; ``atariari/benchmark/ram_annotations.py`` in mila-iqia/atari-representation-learning).
List-valued entries there (e.g. Breakout's ``block_bit_map=range(30)``) are split into ``name_i`` variables, as
AtariARI itself does.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from sslab.errors import SSLabError

_ANNOTATIONS: dict[str, dict[str, int | list[int]]] = {
    "Pong": {
        "player_y": 51,
        "player_x": 46,
        "enemy_y": 50,
        "enemy_x": 45,
        "ball_x": 49,
        "ball_y": 54,
        "enemy_score": 13,
        "player_score": 14,
    },
    "Breakout": {
        "ball_x": 99,
        "ball_y": 101,
        "player_x": 72,
        "blocks_hit_count": 77,
        "block_bit_map": list(range(30)),
        "score": 84,
    },
    "MsPacman": {
        "enemy_sue_x": 6,
        "enemy_inky_x": 7,
        "enemy_pinky_x": 8,
        "enemy_blinky_x": 9,
        "enemy_sue_y": 12,
        "enemy_inky_y": 13,
        "enemy_pinky_y": 14,
        "enemy_blinky_y": 15,
        "player_x": 10,
        "player_y": 16,
        "fruit_x": 11,
        "fruit_y": 17,
        "ghosts_count": 19,
        "player_direction": 56,
        "dots_eaten_count": 119,
        "player_score": 120,
        "num_lives": 123,
    },
    "SpaceInvaders": {
        "invaders_left_count": 17,
        "player_score": 104,
        "num_lives": 73,
        "player_x": 28,
        "enemies_x": 26,
        "missiles_y": 9,
        "enemies_y": 24,
    },
}


def _flatten(annotations: Mapping[str, int | list[int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, addr in annotations.items():
        if isinstance(addr, list):
            out.update({f"{name}_{i}": a for i, a in enumerate(addr)})
        else:
            out[name] = addr
    return out


RAM_ADDRESSES: dict[str, dict[str, int]] = {g: _flatten(a) for g, a in _ANNOTATIONS.items()}
GAMES: tuple[str, ...] = tuple(RAM_ADDRESSES)


def check_game(game: str) -> str:
    if game not in RAM_ADDRESSES:
        raise SSLabError(
            f"Atari game {game!r} has no RAM annotations here; choose from {', '.join(GAMES)} (data.games=[...])"
        )
    return game


def env_id(game: str) -> str:
    """The gymnasium id registered by ale-py for a game name."""
    return f"ALE/{check_game(game)}-v5"


def ram_labels(game: str, ram: np.ndarray) -> tuple[list[str], np.ndarray]:
    """State-variable names and their byte values (N, V) read from RAM rows (N, 128) at AtariARI's addresses."""
    addresses = RAM_ADDRESSES[check_game(game)]
    names = list(addresses)
    return names, np.asarray(ram)[:, [addresses[n] for n in names]]
