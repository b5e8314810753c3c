"""What a HoloKV cache holds at every step, and attention over a whole prompt as if
each query had read that cache (the ``superposed`` prefill).

Per sequence, counting from its first non-pad token: the first ``sinks`` tokens stay
exact; the stream after them is cut into slots of k tokens; a slot is superposed
once all its tokens are older than the exact recent share of the sequence, so the
open (still-filling) slot and the recent tokens stay exact. ``closed(v)`` is the
number of stream tokens superposed once v tokens have been read; both the cache
and the simulator use it, so the simulator's output for query i equals a decode
step of the cache after tokens 0..i-1 (``holo_decode`` semantics, see
:func:`holokv.reference.holo_decode_ref`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..reference import MODES, demodulate_ref


@dataclass(frozen=True)
class HoloSpec:
    """``ratio``: bytes budget, cache bytes ~ tokens / ratio; ``k``: tokens per slot (power of 2, >= ratio).

    A share ``f = (1/ratio - 1/k) / (1 - 1/k)`` of the tokens (sinks included) stays exact and the rest
    is superposed k to a slot, so ``f + (1 - f) / k = 1 / ratio``. Slots close in whole, as soon as the
    exact tokens exceed that share (so the exact recent window is that share minus up to k-1 tokens),
    but never before they are full. ``slot_gain``: see :func:`holokv.ops.holo_decode`.
    """

    k: int
    ratio: float
    sinks: int = 4
    mode: str = "aligned"
    slot_gain: float = 1.0

    def __post_init__(self):
        if self.k not in (1, 2, 4, 8, 16):
            raise ValueError(f"k (tokens per slot) must be one of 1, 2, 4, 8, 16, got {self.k}")
        if not 1 <= self.ratio <= self.k:
            raise ValueError(f"HoloKV with k={self.k} reaches ratios 1..{self.k}, got {self.ratio}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    @property
    def exact_share(self) -> float:
        return 1.0 if self.k == 1 else (1 / self.ratio - 1 / self.k) / (1 - 1 / self.k)

    def closed(self, valid: torch.Tensor) -> torch.Tensor:
        """Stream tokens superposed once ``valid`` (int64 tensor) tokens were read; nondecreasing in valid."""
        sinks = valid.clamp(max=self.sinks)
        exact = torch.maximum(sinks, (valid.double() * self.exact_share).floor().long())
        full_slots = (valid - sinks) // self.k * self.k
        return torch.minimum(full_slots, (valid - exact + self.k - 1) // self.k * self.k)


def superposed_attention(spec: HoloSpec, phase: torch.Tensor, q, k, v, pads: torch.Tensor, scale: float):
    """Causal attention of a prompt through a HoloKV cache; plain PyTorch, differentiable.

    q [B, Hq, N, d], k/v [B, Hkv, N, d] (RoPE applied), pads [B] left pads, phase [k, d] phase keys.
    Returns [B, N, Hq, d]. Superposed reads are the demodulated slot entries, one per superposed token:
    "full" mode sees them all, "aligned" only the phase of the query's own position mod k.
    """
    B, Hq, N, d = q.shape
    Hkv, kk, dev = k.shape[1], phase.shape[0], q.device
    pos = torch.arange(N, device=dev)
    rel = pos - pads[:, None]  # [B, N] index from the first non-pad token (< 0: pad)
    u = rel - spec.sinks  # stream index
    closed = spec.closed(rel.clamp(min=0))  # superposed stream tokens when query i reads (i tokens before it)

    # Demodulated entry of every stream token, built from slots of the stream alone (pads, sinks and
    # filler past the end are left out), then mapped back to sequence order.
    src = pos + pads[:, None] + spec.sinks
    in_stream = (src < N)[:, None, :, None]
    src = src.clamp(max=N - 1)

    def demod(x):
        slots = torch.ops.holokv.superpose(torch.gather(x, 2, src[:, None, :, None].expand_as(x)) * in_stream,
                                           phase)
        return torch.gather(demodulate_ref(slots, phase, N), 2, u.clamp(0, N - 1)[:, None, :, None].expand_as(x))

    causal = (rel[:, None, :] <= rel[:, :, None]) & (rel[:, None, :] >= 0)  # [B, query, key]
    sup = causal & (u[:, None, :] >= 0) & (u[:, None, :] < closed[:, :, None])
    if spec.mode == "aligned":
        sup_read = sup & (u[:, None, :] % kk == rel[:, :, None] % kk)
    else:
        sup_read = sup
    exact = (causal & ~sup) | torch.eye(N, dtype=torch.bool, device=dev)  # pad queries see themselves: no NaN

    qg = q.reshape(B, Hkv, Hq // Hkv, N, d).float()
    s_exact = torch.einsum("bhgqd,bhnd->bhgqn", qg, k.float()) * scale
    s_sup = torch.einsum("bhgqd,bhnd->bhgqn", qg, demod(k).float()) * (scale * spec.slot_gain)
    s = torch.cat([s_exact.masked_fill(~exact[:, None, None], -math.inf),
                   s_sup.masked_fill(~sup_read[:, None, None], -math.inf)], -1)
    vals = torch.cat([v.float(), math.sqrt(kk) * demod(v).float()], 2)
    out = torch.einsum("bhgqn,bhnd->bqhgd", s.softmax(-1), vals)
    return out.reshape(B, N, Hq, d).to(q.dtype)
