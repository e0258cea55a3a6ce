"""Evaluate a checkpoint on frozen features: ``python eval.py ckpt=PATH eval=knn|linear|all``."""

import sys

import hydra
from omegaconf import DictConfig

from sslab.cli import open_overrides, quiet_startup, register_resolvers
from sslab.errors import check_eval_config, fail, user_message

quiet_startup()
register_resolvers()


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        check_eval_config(cfg)
        from sslab.runs.evaluate import evaluate, write_metrics

        write_metrics(evaluate(cfg))  # metrics.json beside eval.log
    except Exception as e:
        message = user_message(e)
        if message is None:
            raise  # a bug: keep its traceback
        fail(message)


if __name__ == "__main__":
    # data.<field>=... overrides the checkpoint's data config without Hydra's "+"
    sys.argv[1:] = open_overrides(sys.argv[1:], ["data"])
    main()
