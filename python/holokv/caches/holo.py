"""HoloKV cache layer: k consecutive tokens share one slot (``torch.ops.holokv.superpose``),
decode attention is ``torch.ops.holokv.holo_decode`` over the slots plus an exact tail.

Per sequence the tail holds, left-aligned, the exact tokens: the sinks, then the
stream tokens not yet superposed (open slot and recent share). The op takes
tail = sinks + recent as one exact segment: softmax attention does not care about
order, positions are already in the keys (RoPE). Slots are never expanded back to
tokens here. What is superposed when is :class:`HoloSpec`'s rule.
"""
from __future__ import annotations

import math

import torch

from .base import FullLayer, append_ragged, exact_attention, take
from .superposed import HoloSpec, superposed_attention

PREFILLS = ("exact", "superposed")


class HoloKVLayer(FullLayer):
    state = ("slot_k", "slot_v", "tail_k", "tail_v", "n_sup", "tail_len")

    def __init__(self, head_dim: int, rope_layout: str, ratio: float = 1.0, k: int | None = None,
                 prefill: str = "exact", **spec):
        super().__init__()
        if prefill not in PREFILLS:
            raise ValueError(f"prefill must be one of {PREFILLS}, got {prefill!r}")
        # Default: the power of two at or above twice the ratio, so about half of the bytes go to exact tokens.
        k = k or min(16, 1 << math.ceil(math.log2(2 * ratio)))
        self.spec = HoloSpec(k=k, ratio=ratio, **spec)
        if head_dim % (2 * k):
            raise ValueError(f"HoloKV with k={k} needs head_dim divisible by {2 * k}, got {head_dim}")
        self.prefill = prefill
        self.phase = torch.ops.holokv.phase_keys(k, head_dim, rope_layout)

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        empty = key_states[:, :, :0]
        self.slot_k, self.slot_v, self.tail_k, self.tail_v = empty, empty, empty, empty
        self.n_sup = torch.zeros(key_states.shape[0], dtype=torch.long, device=self.device)
        self.tail_len = self.n_sup.clone()
        self.phase = self.phase.to(self.device)

    def append(self, k, v):
        self.keys, self.values = k, v  # the new tokens, committed by read() once the pads are known

    def read(self, q, mask, scale, start):
        new_k, new_v = self.keys, self.values
        self.keys = self.values = None
        if start == 0:  # the prompt
            if self.prefill == "exact":
                out = exact_attention(q, new_k, new_v, mask, scale)
            else:
                out = superposed_attention(self.spec, self.phase, q, new_k, new_v, self.pads, scale)
            self.commit(new_k, new_v, start)
            self.compress()
            return out
        outs = []  # several new tokens: one decode step each, so they read what a decode would
        for i in range(q.shape[2]):
            self.commit(new_k[:, :, i: i + 1], new_v[:, :, i: i + 1], start + i)
            outs.append(torch.ops.holokv.holo_decode(
                q[:, :, i], self.slot_k, self.slot_v, self.phase, self.n_sup, self.tail_k, self.tail_v,
                self.tail_len, self.spec.mode, scale, self.spec.slot_gain))
            self.compress()
        return torch.stack(outs, 1)

    def commit(self, k, v, start):
        """Append the non-pad ones of the new tokens (sequence indices start...) to each tail."""
        n = k.shape[2]
        skip = (self.pads - start).clamp(0, n)  # leading pads among the new tokens
        shift = (skip[:, None] + torch.arange(n, device=k.device)).clamp(max=n - 1)
        self.tail_k = append_ragged(self.tail_k, self.tail_len, take(k, shift), n - skip)
        self.tail_v = append_ragged(self.tail_v, self.tail_len, take(v, shift), n - skip)
        self.tail_len = self.tail_len + n - skip

    def compress(self):
        """Superpose the slots that ``HoloSpec.closed`` says are due: tail[sinks : sinks + close]."""
        close = self.spec.closed(self.n_sup + self.tail_len) - self.n_sup
        if not bool(close.any()):
            return
        kk, T = self.spec.k, self.tail_k.shape[2]
        sinks = (self.n_sup + self.tail_len).clamp(max=self.spec.sinks)
        j = torch.arange(int(close.max()), device=self.device)
        src = (sinks[:, None] + j).clamp(max=T - 1)
        inside = (j < close[:, None])[:, None, :, None]  # shorter closings are zero-filled: they add nothing
        for name in ("k", "v"):
            tail, slots = getattr(self, "tail_" + name), getattr(self, "slot_" + name)
            new = torch.ops.holokv.superpose(take(tail, src) * inside, self.phase)
            setattr(self, "slot_" + name, append_ragged(slots, self.n_sup // kk, new, close // kk))
        keep = self.tail_len - close
        j = torch.arange(int(keep.max()), device=self.device)
        src = torch.where(j < sinks[:, None], j, j + close[:, None]).clamp(max=T - 1)
        self.tail_k, self.tail_v = take(self.tail_k, src), take(self.tail_v, src)
        self.n_sup, self.tail_len = self.n_sup + close, keep
