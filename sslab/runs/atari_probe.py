"""``python eval.py eval=atari_probe``: AtariARI-style RAM-state probes of one or more trained runs (and the
first one's architecture at random init) in one table; the probe itself is ``sslab.evaluation.atari_probe``."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from sslab.data.atari import AtariDataModule
from sslab.devices import resolve_device
from sslab.errors import SSLabError
from sslab.evaluation.atari_probe import pooled_embed, probe_game, summarize
from sslab.progress_lines import Phase, say
from sslab.report import print_json_line, print_table
from sslab.runs.reopen import reopen


def evaluate_checkpoints(cfg: DictConfig) -> dict[str, Any]:
    """``python eval.py eval=atari_probe ckpt=A compare=[B, ...]``: probe every checkpoint (and, with
    ``atari_probe.random_init``, the first one's architecture at random init) on the first checkpoint's Atari
    probe episodes; print the per-game / averaged F1 table and return all numbers."""
    paths = [cfg.ckpt, *(cfg.get("compare") or [])]
    first = reopen(paths[0], cfg.get("data"))
    dm, base_cfg = first.datamodule, first.cfg
    if not isinstance(dm, AtariDataModule):
        raise SSLabError(f"eval=atari_probe needs a checkpoint trained with data=atari, not data={dm.name}")
    # every encoder is probed on the same episodes: the first checkpoint's data
    runs = [first, *(reopen(p, datamodule=dm) for p in paths[1:])]
    device = resolve_device(cfg.device)
    opts = OmegaConf.to_container(cfg.atari_probe, resolve=True)
    random_init = bool(opts.pop("random_init", True))
    pool = str(opts.pop("pool", "cls"))
    with Phase(f"Atari probe episodes ({', '.join(dm.games)})", len(dm.games), "games") as phase:
        splits = {}
        for g in dm.games:
            splits[g] = dm.probe_split(g)
            phase.advance()

    encoders = []
    for path, run in zip(paths, runs, strict=True):
        name = f"{run.cfg.method.name} @ step {run.checkpoint.get('global_step')}"
        if any(n == name for n, _ in encoders):
            name = f"{name} ({path})"
        encoders.append((name, run.model))
    if random_init:
        baseline = reopen(paths[0], cfg.get("data"), random_init=True, datamodule=dm).model
        encoders.append((f"random init ({base_cfg.backbone.name})", baseline))

    seed = int(base_cfg.seed)
    per_variable: dict[str, dict[str, dict[str, float]]] = {}
    epochs = opts.get("epochs", 100)
    say(f"Atari probe: {len(encoders)} encoders x {len(dm.games)} games, {epochs} probe epochs each")
    with Phase("Atari probe", len(encoders) * len(dm.games), "probes") as phase:
        for name, model in encoders:
            model.to(device)
            per_variable[name] = {}
            for g in dm.games:
                per_variable[name][g] = probe_game(pooled_embed(model, pool), g, splits[g], seed=seed, **opts)
                phase.advance()
                phase.note(f"{name}, {g}: mean F1 {summarize({g: per_variable[name][g]})[g]:.3f}")
            model.cpu()
    table = {name: summarize(v) for name, v in per_variable.items()}
    sizes = ", ".join(f"{g} {len(s['train_obs'])}/{len(s['test_obs'])}" for g, s in splits.items())
    print_table(
        f"AtariARI probe ({pool} features), mean F1 over state variables (train/test obs: {sizes})",
        table,
        [*dm.games, "mean"],
    )
    metrics = {
        "ckpts": [str(p) for p in paths],
        "pool": pool,
        "atari_probe": table,
        "atari_probe_per_variable": per_variable,
    }
    print_json_line(metrics)
    return metrics
