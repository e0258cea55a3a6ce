"""Evaluate a checkpoint on frozen features: ``python eval.py ckpt=PATH eval=knn|linear|all``."""

import sys

import hydra
from omegaconf import DictConfig

from sslab.errors import SSLabError


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from sslab.evaluate import evaluate

    try:
        evaluate(cfg)
    except SSLabError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
