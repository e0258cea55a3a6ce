"""Pretrain a self-supervised model: ``python train.py method=dino backbone=vit_s``."""

import sys

import hydra
from omegaconf import DictConfig

from sslab.errors import SSLabError


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from sslab.pipeline import pipeline_main
    from sslab.train import train

    try:
        pipeline_main(cfg) if cfg.get("pipeline") else train(cfg)
    except SSLabError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
