"""Training callbacks; none of them knows which method it evaluates (they call ``embed_uint8``)."""

from sslab.callbacks.attention_maps import AttentionMaps
from sslab.callbacks.knn import KNNEval
from sslab.callbacks.linear_probe import OnlineLinearProbe
from sslab.callbacks.throughput import Throughput

__all__ = ["AttentionMaps", "KNNEval", "OnlineLinearProbe", "Throughput"]
