"""One LightningModule per method; ``conf/method/<name>.yaml`` names the class in ``_target_``."""

from sslab.methods.base import DataSpec, SSLMethod
from sslab.methods.dino import DINO

__all__ = ["DINO", "DataSpec", "SSLMethod"]
