"""Pretrain a self-supervised model: ``python train.py method=dino backbone=vit_s``."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from sslab.cli import listed_keys, open_overrides, quiet_startup, register_resolvers, slurm_unreachable
from sslab.errors import check_train_config, fail, user_message

quiet_startup()
register_resolvers()  # ${auto_precision:} resolves under --cfg job --resolve too


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        check_train_config(cfg)  # before the heavy imports: a mistyped setting is refused in a second
        from sslab.runs.pipeline import pipeline_main
        from sslab.runs.training import train

        pipeline_main(cfg) if cfg.get("pipeline") else train(cfg)
    except Exception as e:
        message = user_message(e)
        if message is None:
            raise  # a bug: keep its traceback
        fail(message)


if __name__ == "__main__":
    # any Lightning Trainer option without Hydra's "+" (sslab.runs.training refuses names the Trainer does not take)
    listed = listed_keys(str(Path(__file__).parent / "conf" / "trainer" / "default.yaml"), "trainer")
    sys.argv[1:] = open_overrides(sys.argv[1:], ["trainer"], listed)
    unreachable = slurm_unreachable(sys.argv[1:])
    if unreachable:
        fail(unreachable, log_file=False)
    main()
