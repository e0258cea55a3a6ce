"""``eval_mode(module)``: evaluate with a module in eval mode and give it back in the mode it had.

A bottom-floor helper (it imports only torch), so backbones, methods and callbacks share one copy: features,
pictures and probes are taken in eval mode (dropout off, BatchNorm on running statistics) from the middle
of training, which must then carry on in train mode as if nothing had happened.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module.eval()`` for the block, then ``module.train(mode it had)``, also when the block raises."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
