"""StreamingLLM's cache: attention sinks and a recent window."""
from __future__ import annotations

import torch

from .select import INF, EvictingLayer


class StreamingLayer(EvictingLayer):
    """StreamingLLM (Xiao et al. 2023): the first ``sinks`` tokens plus the most recent ones."""

    def __init__(self, ratio: float = 1.0, sinks: int = 4):
        super().__init__(ratio)
        self.sinks = sinks

    def prompt_scores(self, q, k, v, mask, scale, pos):
        return torch.where(pos < self.sinks, INF, pos.float()).expand(*k.shape[:3])

    def decode_scores(self, q, scale, held):
        return torch.where(self.rel < self.sinks, INF, self.rel.float())
