"""Top-K's cache: the tokens the prompt attends most."""
from __future__ import annotations

from ..compaction.scores import attention_mass
from .select import SelectionLayer


class TopKLayer(SelectionLayer):
    """One-shot top-k by the attention mass the whole prompt gives each token."""

    def prompt_scores(self, q, k, v, mask, scale, pos):
        return attention_mass(q, k, scale, mask)
