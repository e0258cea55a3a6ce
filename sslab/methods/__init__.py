"""One LightningModule per method; ``conf/method/<name>.yaml`` names the class in ``_target_``."""

from sslab.methods.base import DataSpec, SSLMethod
from sslab.methods.dino import DINO, IBOT, DINOv2
from sslab.methods.tov_vicreg import TOVVICReg
from sslab.methods.vicreg import VICReg

__all__ = ["DINO", "IBOT", "DINOv2", "DataSpec", "SSLMethod", "TOVVICReg", "VICReg"]
