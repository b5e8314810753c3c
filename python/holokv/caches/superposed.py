"""What a HoloKV cache holds at every step, and attention over a whole prompt as if
each query had read that cache (the ``superposed`` prefill, and the training attention).

Per sequence, counting from its first non-pad token: the first ``sinks`` tokens stay
exact; the stream after them is cut into slots of k tokens; a slot is superposed
once all its tokens are older than the exact recent share of the sequence, so the
open (still-filling) slot and the recent tokens stay exact. ``closed(v)`` is the
number of stream tokens superposed once v tokens have been read (with a window of W
slots, block-level eviction, only the last W are held and the rule counts the tokens
held; ``closed`` is then its closed form). The cache's prompt
compression, ``holo_append`` (the same rule in C++) and the prompt attention's mask
(:func:`prefill_mask`) follow it, so prompt query i reads what a decode step of the
cache reads after tokens 0..i-1 (``holo_decode`` semantics, see
:func:`holokv.reference.holo_decode_ref`). The mask and the entries (:func:`virtual_kv`)
serve both the dense reference here and the FlexAttention path
(:mod:`holokv.caches.prefill_attention`).
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from functools import cached_property

import torch

from ..reference import MODES, closed_tokens_ref, demodulate_ref
from ..compaction.scores import take
from .base import left_aligned


@dataclass(frozen=True)
class HoloSpec:
    """``ratio``: bytes budget, cache bytes ~ tokens / ratio; ``k``: tokens per slot (power of 2, >= ratio).

    A share ``f = (1/ratio - 1/k) / (1 - 1/k)`` of the tokens (sinks included) stays exact and the rest
    is superposed k to a slot, so ``f + (1 - f) / k = 1 / ratio``. Slots close in whole, as soon as the
    exact tokens exceed that share (so the exact recent window is that share minus up to k-1 tokens),
    but never before they are full. ``slot_gain``: see :func:`holokv.ops.holo_decode`.

    ``window_slots`` W > 0: only the last W slots are held, the older ones dropped whole (block-level
    eviction, ``holo_append``'s window), and the share counts the tokens held, so the exact recent
    tokens are that share of what the cache covers and the cache stays bounded.
    """

    k: int
    ratio: float
    sinks: int = 4
    mode: str = "aligned"
    slot_gain: float = 1.0
    window_slots: int = 0

    def __post_init__(self):
        if self.k not in (1, 2, 4, 8, 16):
            raise ValueError(f"k (tokens per slot) must be one of 1, 2, 4, 8, 16, got {self.k}")
        if not 1 <= self.ratio <= self.k:
            raise ValueError(f"HoloKV with k={self.k} reaches ratios 1..{self.k}, got {self.ratio}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not (isinstance(self.window_slots, int) and self.window_slots >= 0):
            raise ValueError(f"window_slots must be an int >= 0 (0: no window), got {self.window_slots!r}")

    @property
    def exact_share(self) -> float:
        return 1.0 if self.k == 1 else (1 / self.ratio - 1 / self.k) / (1 - 1 / self.k)

    def rule(self, held: torch.Tensor) -> torch.Tensor:
        """Stream tokens superposed once ``held`` (int64 tensor) tokens are held: ``holo_append``'s rule."""
        sinks = held.clamp(max=self.sinks)
        exact = torch.maximum(sinks, (held.double() * self.exact_share).floor().long())
        full_slots = (held - sinks) // self.k * self.k
        return torch.minimum(full_slots, (held - exact + self.k - 1) // self.k * self.k)

    def closed(self, valid: torch.Tensor) -> torch.Tensor:
        """Stream tokens superposed once ``valid`` (int64 tensor) tokens were read, dropped ones included;
        nondecreasing in valid."""
        first = self.first_eviction
        if first is None:
            return self.rule(valid)
        # From the first close past the window on, each close drops a slot: the tokens held return to where
        # they were then every k tokens, and the rule closes one slot each time.
        after = (self.window_slots + 1 + (valid - first) // self.k) * self.k
        return torch.where(valid < first, self.rule(valid), after)

    def held(self, closed: torch.Tensor) -> torch.Tensor:
        """Superposed tokens the slots hold once ``closed`` were superposed."""
        return closed.clamp(max=self.window_slots * self.k) if self.window_slots else closed

    @cached_property
    def first_eviction(self) -> int | None:
        """Tokens read when a slot first closes on a full window (None: never), the least v whose rule passes
        W slots; below it the rule reads all tokens read."""
        if not self.window_slots or self.exact_share == 1:
            return None
        W, k, f = self.window_slots, self.k, self.exact_share
        # past this, both the whole slots and the tokens over the exact share exceed W slots
        end = self.sinks + (W + 1) * k + math.ceil((W + 1) * k / (1 - f)) + 1
        return bisect.bisect_right(range(end), W * k, key=lambda v: closed_tokens_ref(v, self.sinks, k, f))

    def counted(self, valid: int) -> int:
        """The most tokens the rule counts once ``valid`` were read (a host-side bound: a window caps them)."""
        first = self.first_eviction
        return valid if first is None else min(valid, first)


def virtual_kv(spec: HoloSpec, phase: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pads: torch.Tensor):
    """The prompt's exact keys (values) then one virtual entry per stream token: [B, Hkv, 2N, d] each.

    Virtual entry m is stream token m of its sequence (left pads and sinks skipped) as a closed slot serves
    it: slot m // k demodulated under phase m % k, keys times slot_gain, values times sqrt(k) (holo_decode's
    superposed reads). Slots past the stream's end hold filler, but they never close, so it is never read.
    """
    n = k.shape[2]
    stream = left_aligned(pads + spec.sinks, n)

    def demod(x):
        return demodulate_ref(torch.ops.holokv.superpose(take(x, stream), phase), phase, n)

    return torch.cat([k, spec.slot_gain * demod(k)], 2), torch.cat([v, math.sqrt(spec.k) * demod(v)], 2)


def prefill_mask(spec: HoloSpec, pads: torch.Tensor, n: int):
    """What each query of an n-token prompt reads among :func:`virtual_kv`'s 2n entries.

    A FlexAttention ``mask_mod(b, h, q, kv)`` (h unused) that also evaluates on broadcast index tensors.
    Query q reads the exact tokens of its sequence up to itself that are not superposed when it reads
    (after q tokens: ``closed``), the virtual entries of the closed stream tokens still held ("aligned": only
    those of phase q mod k, counted from the first non-pad token), and itself (a pad query reads only itself).
    """
    rel = torch.arange(n, device=pads.device) - pads[:, None]  # [B, n] index from the first non-pad token
    closed = spec.closed(rel.clamp(min=0))
    dropped = closed - spec.held(closed)  # a window's evicted slots

    def mask_mod(b, h, q, kv):
        c, first = closed[b, q], pads[b]
        u = kv - first - spec.sinks  # stream index of exact token kv (< 0: a sink)
        exact = (kv <= q) & (kv >= first) & ((u < 0) | (u >= c))
        m = kv - n  # stream index of virtual entry kv
        virtual = (m >= dropped[b, q]) & (m < c)
        if spec.mode == "aligned":
            virtual = virtual & ((m - (q - first)) % spec.k == 0)
        return exact | virtual | (kv == q)

    return mask_mod


def superposed_attention(spec: HoloSpec, phase: torch.Tensor, q, k, v, pads: torch.Tensor, scale: float):
    """Causal attention of a prompt through a HoloKV cache: the dense plain-PyTorch reference, differentiable.

    q [B, Hq, N, d], k/v [B, Hkv, N, d] (RoPE applied), pads [B] left pads, phase [k, d] phase keys.
    Returns [B, N, Hq, d]. Softmax over :func:`virtual_kv` under :func:`prefill_mask`, in fp32 (fp64 for
    fp64 input); :func:`holokv.caches.prefill_attention.holo_prefill_attention` is its fast twin.
    """
    B, Hq, n, d = q.shape
    Hkv, dev = k.shape[1], q.device
    dt = torch.promote_types(q.dtype, torch.float32)
    keys, values = virtual_kv(spec, phase.to(dev, dt), k.to(dt), v.to(dt), pads)
    b, i, j = (torch.arange(x, device=dev) for x in (B, n, 2 * n))
    read = prefill_mask(spec, pads, n)(b[:, None, None], None, i[None, :, None], j[None, None, :])  # [B, q, kv]
    s = torch.einsum("bhgqd,bhnd->bhgqn", q.to(dt).reshape(B, Hkv, Hq // Hkv, n, d), keys) * scale
    p = s.masked_fill(~read[:, None, None], -math.inf).softmax(-1)
    return torch.einsum("bhgqn,bhnd->bqhgd", p, values).reshape(B, n, Hq, d).to(q.dtype)
