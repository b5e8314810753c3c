"""Compacted-cache format and plain PyTorch attention over it (decoding over it is
``holokv.holo_decode`` with no superposed slots and ``tail_bias``)."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch


class CompactKV(NamedTuple):
    """One layer's compacted cache, per (batch, kv head).

    Entries are exact tokens and SRC centroids alike; attention over them is
    ``softmax(scale·q·kᵀ + bias)·v`` over the first ``lens[b]`` entries, where
    ``bias`` is the entry's log-mass: 0 for an exact token, ≈ log(#tokens it
    stands for) for a centroid, so a centroid takes its bin's share of the
    global softmax.
    """

    k: torch.Tensor  # [B, Hkv, N, d]
    v: torch.Tensor  # [B, Hkv, N, d]
    bias: torch.Tensor  # [B, Hkv, N]
    lens: torch.Tensor  # [B] int64, 1 <= lens <= N


def pool_gqa(q: torch.Tensor, n_kv: int) -> torch.Tensor:
    """[B, Hq, m, d] -> [B, Hkv, G·m, d]: the G query heads that share a KV head become rows."""
    B, Hq, m, d = q.shape
    return q.reshape(B, n_kv, (Hq // n_kv) * m, d)


def logits(q, k, bias=None, mask=None, scale=None):
    """Attention logits of rows q [..., m, d] against k [..., n, d] -> [..., m, n].

    bias [..., n] is added to every row, mask [..., m, n] (True = visible) sets
    hidden entries to -inf; scale defaults to 1/sqrt(d).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = (q @ k.mT) * scale
    if bias is not None:
        out = out + bias.unsqueeze(-2)
    if mask is not None:
        out = out.masked_fill(~mask, float("-inf"))
    return out


def attend(q, k, v, bias=None, mask=None, scale=None):
    """Softmax attention (see :func:`logits`) -> (out [..., m, d], probs [..., m, n])."""
    probs = torch.softmax(logits(q, k, bias, mask, scale), -1)
    return probs @ v, probs



def attend_chunked(q, k, v=None, bias=None, mask=None, scale=None, chunk: int = 1024):
    """Softmax attention of rows q [..., m, d] (fp32 or fp64: the working precision) over a long k, v [..., n, d]
    of any float dtype, converted to q's dtype ``chunk`` entries at a time (so nothing the size of the cache is
    ever made in fp32): the online softmax of flash attention. bias [..., n], mask [..., m, n] as in
    :func:`logits`.
    Returns (out [..., m, d] or None without v, lse [..., m]); a row that sees nothing gets out 0, lse -inf.
    """
    n = k.shape[-2]
    run_max = run_sum = out = None
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        part = logits(q, k[..., s:e, :].to(q.dtype), None if bias is None else bias[..., s:e].to(q.dtype),
                      None if mask is None else mask[..., s:e], scale)
        new_max = part.amax(-1) if run_max is None else torch.maximum(run_max, part.amax(-1))
        base = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))  # all hidden so far: 0
        p = (part - base.unsqueeze(-1)).exp()
        if run_max is None:
            run_sum, out = p.sum(-1), None if v is None else p @ v[..., s:e, :].to(q.dtype)
        else:
            alpha = (run_max - base).exp()
            run_sum = run_sum * alpha + p.sum(-1)
            if v is not None:
                out = out * alpha.unsqueeze(-1) + p @ v[..., s:e, :].to(q.dtype)
        run_max = base
    lse = run_max + run_sum.log()  # -inf where nothing was seen
    if out is not None:
        out = out / run_sum.clamp_min(torch.finfo(out.dtype).tiny).unsqueeze(-1)
    return out, lse
