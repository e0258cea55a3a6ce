"""Interchangeable encoders behind one small interface (see ``base.Backbone``)."""

from sslab.backbones.base import Backbone
from sslab.backbones.registry import BACKBONES, build

__all__ = ["BACKBONES", "Backbone", "build"]
