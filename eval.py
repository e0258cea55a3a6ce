"""Evaluate a checkpoint on frozen features: ``python eval.py ckpt=PATH eval=knn|linear|all``."""

import hydra
from omegaconf import DictConfig

from sslab.errors import check_eval_config, fail, user_message


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        check_eval_config(cfg)
        from sslab.evaluate import evaluate

        evaluate(cfg)
    except Exception as e:
        message = user_message(e)
        if message is None:
            raise  # a bug: keep its traceback
        fail(message)


if __name__ == "__main__":
    main()
