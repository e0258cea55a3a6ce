"""Batched, on-device view pipelines (kornia)."""

from sslab.augment.multicrop import MultiCropViews, eval_view, to_float

__all__ = ["MultiCropViews", "eval_view", "to_float"]
