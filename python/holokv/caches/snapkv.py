"""SnapKV's cache: the tokens the prompt's last queries attend."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..compaction.scores import attention_mass
from .select import INF, SelectionLayer


class SnapKVLayer(SelectionLayer):
    """SnapKV (Li et al. 2024): the last ``window`` prompt queries vote (attention summed over them and the
    GQA group, max-pooled over neighbouring tokens so clusters survive); the window itself is always kept."""

    def __init__(self, ratio: float = 1.0, window: int = 32, kernel: int = 7, adaptive: float | None = None):
        super().__init__(ratio, adaptive)
        self.window, self.kernel = window, kernel

    def prompt_scores(self, q, k, v, mask, scale, pos):
        n = q.shape[2]
        w = min(self.window, n)
        votes = attention_mass(q[:, :, -w:], k, scale, None if mask is None else mask[:, :, -w:])
        B, H, _ = votes.shape
        votes = F.max_pool1d(votes.view(B * H, 1, n), self.kernel, 1, self.kernel // 2).view(B, H, n)
        return votes.masked_fill(torch.arange(n, device=q.device) >= n - w, INF)
