"""TOVA's cache: the tokens the current query attends."""
from __future__ import annotations

from ..compaction.scores import attention_mass
from .base import FullLayer
from .select import EvictingLayer


class TOVALayer(EvictingLayer):
    """TOVA (Oren et al. 2024, "Transformers are Multi-State RNNs"): over budget, the entry the current query
    weighs least goes, itself included. The weights are averaged over all the layer's query heads (the paper's
    layer-wise policy, as kvpress's TOVAPress), so every KV head drops the same token. The prompt is compressed
    as kvpress does it: by the last prompt query's weights, not token by token. Scores read no positions, so no
    per-entry state is held."""

    state = ()
    batch_state = FullLayer.batch_state

    def prompt_scores(self, q, k, v, mask, scale, pos):
        w = attention_mass(q[:, :, -1:], k, scale, None if mask is None else mask[:, :, -1:])  # group means
        return w.mean(1, keepdim=True).expand_as(w)

    def decode_scores(self, q, scale, held):
        w = self.read_weights(q, scale, held).mean(2)
        return w.mean(1, keepdim=True).expand_as(w)
