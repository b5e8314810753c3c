"""SRC cache layer: one-shot compaction of the prompt with :func:`holokv.src.compact`.

After the (exact) prefill each sequence's prompt becomes kept tokens plus centroid
entries with a log-mass bias, sized to ``ceil(tokens / ratio)`` token-equivalents
of bytes (bias included); SnapKV's observation window (the last ``window`` prompt
queries) scores the tokens and is what the centroids are fitted for. Later tokens
are appended exact (bias 0). Decode reads the entries with
``torch.ops.holokv.holo_decode`` and no superposed slots: softmax(scale·q·kᵀ + bias)·v.
Entries are unordered, positions live in the (RoPE'd) keys.
"""
from __future__ import annotations

import math

import torch
from torch.nn.utils.rnn import pad_sequence

from ..src import causal_stats, check_info, compact, plan
from ..src.compact import entry_elems
from .base import FullLayer, append_ragged, exact_attention

SCORES = ("mass", "seed")
CENTROID_SHARE = 1 / 8  # default bin size: centroids take about this share of the budget (bench/src_quality.py)


def ragged(parts: list[torch.Tensor]) -> torch.Tensor:
    """Per-sequence [1, H, n_b, ...] tensors -> [B, H, max n_b, ...], zero-filled past each n_b."""
    return pad_sequence([p[0].transpose(0, 1) for p in parts], batch_first=True).transpose(1, 2).contiguous()


class SRCLayer(FullLayer):
    """Options: ``method`` of the summary ("softmax_ls": fitted values and log-mass, or "seed": the source
    method's linear read-out), ``score`` deciding what stays exact ("mass": window attention, or "seed":
    mass − ``lam``·row entropy), ``rank`` centroids per bin of ``bin_size`` evicted tokens (default: centroids
    take about 1/8 of the budget), ``ridge`` of the value fit, ``window`` observation queries, ``sinks`` and
    ``recent`` tokens always kept exact. A prompt fed in several chunks is compacted after its first one."""

    def __init__(self, ratio: float = 1.0, method: str = "softmax_ls", score: str = "mass", rank: int = 4,
                 ridge: float = 1.0, window: int = 32, bin_size: int | None = None, sinks: int = 4,
                 recent: int = 32, lam: float = 0.5):
        super().__init__()
        if ratio < 1:
            raise ValueError(f"ratio must be >= 1, got {ratio}")
        if method not in ("softmax_ls", "seed"):  # "evict" is the snapkv/topk cache
            raise ValueError(f"method must be 'softmax_ls' or 'seed', got {method!r}")
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        bin_size = bin_size or max(2 * rank, math.ceil(rank * ratio / CENTROID_SHARE))
        if not 0 < rank < bin_size:
            raise ValueError(f"need 0 < rank < bin_size, got rank={rank}, bin_size={bin_size}")
        if not 0 < window <= recent:
            raise ValueError(f"need 0 < window <= recent (the observation window stays exact), got "
                             f"window={window}, recent={recent}")
        self.ratio, self.method, self.score, self.lam = ratio, method, score, lam
        self.rank, self.ridge, self.window, self.bin_size, self.sinks, self.recent = (
            rank, ridge, window, bin_size, sinks, recent)
        # seed centroids carry no log-mass, so only softmax_ls stores (and pays for) a bias per entry
        self.state = ("keys", "values", "lens") + (("bias",) if method == "softmax_ls" else ())

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        self.lens = torch.zeros(key_states.shape[0], dtype=torch.long, device=self.device)
        self.bias = key_states.new_zeros(*key_states.shape[:2], 0) if "bias" in self.state else None

    def append(self, k, v):
        self.new = k, v  # read() commits them: the prompt compacted, later tokens exact

    def read(self, q, mask, scale, start):
        k, v = self.new
        self.new = None
        if start == 0:
            out = exact_attention(q, k, v, mask, scale)
            self.compact(q, k, v, scale)
            return out
        no_slots, phase = k[:, :, :0], k.new_ones(1, k.shape[3])  # an empty superposed part (phase unused)
        outs = []  # several new tokens: one decode step each, so they read what a decode would
        for i in range(q.shape[2]):
            one = torch.ones_like(self.lens)
            self.keys = append_ragged(self.keys, self.lens, k[:, :, i: i + 1], one)
            self.values = append_ragged(self.values, self.lens, v[:, :, i: i + 1], one)
            if self.bias is not None:
                self.bias = append_ragged(self.bias, self.lens, self.bias.new_zeros(*k.shape[:2], 1), one)
            self.lens = self.lens + 1
            outs.append(torch.ops.holokv.holo_decode(
                q[:, :, i].contiguous(), no_slots, no_slots, phase, torch.zeros_like(self.lens), self.keys,
                self.values, self.lens, "full", scale, 1.0, self.bias))
        return torch.stack(outs, 1)

    def compact(self, q, k, v, scale) -> None:
        """Compact each sequence's prompt (pads cut off, so each gets its own budget) and store them ragged."""
        parts = []
        for b, pad in enumerate(self.pads.tolist()):
            # fp32: the solves (eigh, Cholesky) have no half-precision kernels
            qb, kb, vb = (x[b: b + 1, :, pad:].float() for x in (q, k, v))
            n, d = kb.shape[2], kb.shape[3]
            budget, method = max(1, math.ceil(n / self.ratio)), self.method
            try:
                plan(n, budget, method=method, head_dim=d, bin_size=self.bin_size, rank=self.rank)
            except ValueError:  # too short a prompt for one bin's centroids: keep what the bytes allow
                budget, method = budget * 2 * d // entry_elems(method, d), "evict"
            entropy = causal_stats(qb, kb, scale)[1] if self.score == "seed" else None
            c, info = compact(qb[:, :, -self.window:], kb, vb, budget=budget, method=method, score=self.score,
                              row_entropy=entropy, lam=self.lam, bin_size=self.bin_size, rank=self.rank,
                              n_sink=self.sinks, n_recent=self.recent, ridge=self.ridge, scale=scale)
            check_info(info)  # once per prompt and layer: the host sync is affordable
            parts.append(c)
        self.keys, self.values = ragged([c.k for c in parts]).to(k.dtype), ragged([c.v for c in parts]).to(k.dtype)
        self.lens = torch.cat([c.lens for c in parts]).to(self.lens)
        if self.bias is not None:
            self.bias = ragged([c.bias for c in parts]).to(k.dtype)
