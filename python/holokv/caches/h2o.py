"""H2O's cache: heavy hitters and a recent window."""
from __future__ import annotations

import torch

from ..compaction.scores import attention_mass
from .select import INF, EvictingLayer


class H2OLayer(EvictingLayer):
    """H2O (Zhang et al. 2023): heavy hitters by accumulated attention plus the recent half of the budget;
    evicts after every read, accumulating the weights each new query gives."""

    state = ("rel", "acc")
    batch_state = EvictingLayer.batch_state + ("acc",)

    def __init__(self, ratio: float = 1.0, recent: float = 0.5):
        super().__init__(ratio)
        self.recent = recent  # share of the budget reserved for the most recent tokens

    def protect_recent(self, acc, rel, valid) -> torch.Tensor:
        n_recent = (self.budget(valid).double() * self.recent).long()
        return acc.masked_fill(rel >= (valid - n_recent).view(-1, 1, 1), INF)

    def prompt_scores(self, q, k, v, mask, scale, pos):
        self.mass = attention_mass(q, k, scale, mask)
        return self.protect_recent(self.mass, pos, self.n_valid)

    def prompt_mass(self, chosen):
        """The accumulated mass (without the recent window's protection) the kept prompt tokens start with."""
        mass, self.mass = self.mass, None
        return mass.gather(2, chosen).masked_fill(~self.holds_state(self.n_valid).view(-1, 1, 1), 0.0)

    def decode_scores(self, q, scale, held):
        # averaged over the group, as the prompt's mass; a sequence that does not evict yet holds none
        self.acc.add_(self.read_weights(q, scale, held).mean(-2).masked_fill(
            ~self.holds_state(self.n_valid).view(-1, 1, 1), 0.0))
        return self.protect_recent(self.acc, self.rel, self.n_valid)
