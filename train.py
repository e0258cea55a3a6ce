"""Pretrain a self-supervised model: ``python train.py method=dino backbone=vit_s``."""

import hydra
from omegaconf import DictConfig

from sslab.errors import check_train_config, fail, user_message


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        check_train_config(cfg)  # before the heavy imports: a mistyped setting is refused in a second
        from sslab.pipeline import pipeline_main
        from sslab.train import train

        pipeline_main(cfg) if cfg.get("pipeline") else train(cfg)
    except Exception as e:
        message = user_message(e)
        if message is None:
            raise  # a bug: keep its traceback
        fail(message)


if __name__ == "__main__":
    main()
