"""HoloKV cache layer: k consecutive tokens share one slot, read by ``torch.ops.holokv.holo_decode``.

The store holds superposed slots plus, per sequence, a ring of exact entries: the sinks, then
the stream tokens not yet superposed (the open slot and the recent share). Each decode step is
one ``holo_append`` (the new token into the ring; a slot that is due is summed and written
once) and one ``holo_decode``. Slots are never expanded back to tokens. What is superposed when
is :class:`HoloSpec`'s rule, which the prefill, the simulator and the op share.
"""
from __future__ import annotations

import math

import torch

from ..compaction.scores import take
from .base import FullLayer, exact_attention, left_aligned
from .prefill_attention import holo_prefill_attention
from .store import Store, rows
from .superposed import HoloSpec

PREFILLS = ("exact", "superposed")


class HoloKVLayer(FullLayer):
    """Options: ``k`` tokens per slot (default: from the ratio), ``prefill``, and :class:`HoloSpec`'s ``sinks``,
    ``mode``, ``slot_gain`` and ``window_slots``.

    ``window_slots=W`` (default None: every slot is kept) is block-level eviction, the seed's streaming mode:
    only the last W slots are held, each new one replacing the oldest, and the exact share counts the tokens
    held. Memory is then bounded whatever the length: the sinks, the exact share of what the window covers
    plus the open slot, and W slots (``nbytes()`` stops growing once the window is full).
    """

    def __init__(self, head_dim: int, rope_layout: str, ratio: float = 1.0, k: int | None = None,
                 prefill: str = "exact", window_slots: int | None = None, **spec):
        FullLayer.__init__(self)
        if prefill not in PREFILLS:
            raise ValueError(f"prefill must be one of {PREFILLS}, got {prefill!r}")
        # Default: the power of two at or above twice the ratio, so about half of the bytes go to exact tokens.
        k = k or min(16, 1 << math.ceil(math.log2(2 * ratio)))
        self.ratio = ratio
        self.spec = HoloSpec(k=k, ratio=ratio, window_slots=window_slots or 0, **spec)
        if head_dim % (2 * k):
            raise ValueError(f"HoloKV with k={k} needs head_dim divisible by {2 * k}, got {head_dim}")
        self.prefill_mode = prefill
        self.phase = torch.ops.holokv.phase_keys(k, head_dim, rope_layout)

    def new_store(self, like: torch.Tensor) -> Store:
        return Store(like, phase=self.phase)

    def prefill(self, q, k, v, mask, scale, pads):
        if self.prefill_mode == "exact":
            out = exact_attention(q, k, v, mask, scale)
        else:
            out = holo_prefill_attention(q, k, v, self.store.phase, self.spec, pads, scale)
        self.compress_prompt(q, k, v, mask, scale, pads)
        return out

    def compress_prompt(self, q, k, v, mask, scale, pads):
        """Superpose each sequence's due slots (a window's last ones, in its ring's rows); its sinks and the rest
        of the stream start the ring."""
        n, kk, spec, W = k.shape[2], self.spec.k, self.spec, self.spec.window_slots
        valid = self.n_valid
        sinks = valid.clamp(max=spec.sinks)
        # [B] stream tokens superposed (a multiple of k) and those held, from the host's lengths: they size the
        # buffers too
        closed = spec.closed(torch.tensor([n - p for p in self.pads]))
        held = spec.held(closed)
        width, n_slots = int((n - torch.tensor(self.pads) - closed).max()), int(held.max()) // kk
        closed, held = closed.to(k.device), held.to(k.device)
        j = torch.arange(n, device=k.device)
        block = j[:n_slots].expand(len(self.pads), -1)  # [B, n_slots] the stream block each slot row holds
        if W:  # in a window's ring, the last block in the row's class mod W (< 0: the row is not held yet)
            block = block + W * ((closed[:, None] // kk - 1 - block) // W)
        tokens = (block[:, :, None] * kk + j[:kk]).flatten(1)  # [B, n_slots * k] their stream tokens
        seq = left_aligned(pads, n)  # each sequence's tokens first
        stream = seq.gather(1, (sinks[:, None] + tokens).clamp(0, n - 1))
        inside = ((tokens >= 0) & (tokens < closed[:, None]))[:, None, :, None]
        ring = seq.gather(1, torch.where(j < sinks[:, None], j, j + closed[:, None]).clamp(max=n - 1)[:, :width])
        slots = [torch.ops.holokv.superpose(take(x, stream) * inside, self.store.phase) for x in (k, v)]
        self.store.write(take(k, ring), take(v, ring), valid - closed)
        self.store.write_slots(*slots, held, closed - held)
        self.reserve(0, exact=True)

    def decode(self, q, k, v, scale):
        self.count_token()
        s = self.store
        torch.ops.holokv.holo_append(rows(k), rows(v), s.phase, s.k_slots, s.v_slots, s.k, s.v,
                                     s.slot_lens, s.lens, s.start, self.spec.sinks, self.spec.exact_share,
                                     self.spec.window_slots, s.evicted)
        return s.decode(q, scale, self.spec.mode, self.spec.slot_gain)

    def reserve(self, tokens: int, exact: bool = False) -> None:
        """The ring holds the sinks, the exact share of the tokens counted and up to a slot more; the slots the
        rest (at most a window)."""
        most = self.bound(self.seen + tokens)
        spec = self.spec
        slots = -(-most // spec.k)
        self.store.reserve(spec.sinks + math.ceil(spec.counted(most) * spec.exact_share) + spec.k + 1,
                           min(slots, spec.window_slots) if spec.window_slots else slots, exact)
