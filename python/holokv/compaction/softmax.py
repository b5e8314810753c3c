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
    if n == 0:  # nothing to see (a prompt compacted to centroids only has no exact context)
        rows = torch.broadcast_shapes(q.shape[:-1], k.shape[:-2] + q.shape[-2:-1])
        return None if v is None else q.new_zeros(*rows, v.shape[-1]), q.new_full(rows, -math.inf)
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



def attend_window(q, k, v, bias, lens, m: int, hidden=None, scale=None):
    """Causal attention of the queries of each sequence's last ``m`` entries (its observation window) over its
    entries [0, lens) -> (out [B, H, rows, d], lse [B, H, rows]) in q's dtype.

    q [B, H, rows, d] pooled rows (:func:`pool_gqa`: row r is query r mod m of a group head, query 0 the
    oldest; query i is entry lens − m + i and sees the entries up to itself); k, v [B, H, W, d] in the cache's
    dtype; bias [B, H, W] or None; lens [B] int64 (m <= lens <= W); hidden [B, W] bool or None: entries no
    query sees.

    The entries before the window, which every row sees alike, take one fused pass on CUDA: the memory-efficient
    SDPA kernel, which returns the log-partition (the rows are rounded to the cache's dtype for it), with the
    bias and the mask as one row-broadcast additive bias; elsewhere, or for 32-bit caches, chunk by chunk
    (:func:`attend_chunked`). The window's own m entries take a small causal pass in q's dtype; the two parts
    merge by their log-partitions. Nothing the size of the cache is made in fp32.
    """
    B, H, rows, d = q.shape
    W, dev = k.shape[2], k.device
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    fused = k.is_cuda and k.dtype in (torch.float16, torch.bfloat16)
    dtype = k.dtype if fused else q.dtype
    first = (lens - m).view(B, 1, 1)  # the window's first entry
    if hidden is not None and hidden.dim() == 2:
        hidden = hidden[:, None]
    shared = torch.arange(W, device=dev) < first  # [B, 1 or H, W]
    if hidden is not None:
        shared = shared & ~hidden
    # the bias of the shared part, -inf where masked; its row stride padded to 16 elements (the fused kernel
    # reads it in aligned vectors)
    prefix = torch.empty(B, H, 1, W + (-W % 16), dtype=dtype, device=dev)[..., :W]
    prefix[:, :, 0] = torch.where(shared, 0.0 if bias is None else bias.to(dtype), -math.inf)
    if fused:
        out_p, lse_p = torch.ops.aten._scaled_dot_product_efficient_attention(
            q.to(dtype), k, v, prefix.expand(B, H, rows, W), True, scale=scale)[:2]
        out_p, lse_p = out_p.to(q.dtype), lse_p[..., :rows].to(q.dtype)
    else:
        out_p, lse_p = attend_chunked(q, k, v, prefix[:, :, 0], None, scale)

    cols = (first.view(B, 1) + torch.arange(m, device=dev)).view(B, 1, m, 1)
    near = [x.gather(2, cols.expand(B, H, m, d)).to(q.dtype) for x in (k, v)]
    near_bias = None if bias is None else bias.gather(2, cols[..., 0].expand(B, H, m)).to(q.dtype)
    see = torch.arange(m, device=dev) <= (torch.arange(rows, device=dev) % m)[:, None]  # [rows, m] causal
    if hidden is not None:
        see = see & ~hidden.gather(2, cols.view(B, 1, m).expand(B, hidden.shape[1], m)).unsqueeze(2)
    out_w, lse_w = attend_chunked(q, *near, near_bias, see, scale)

    # a sequence with nothing before its window takes the window's part alone (the fused kernel's output for a
    # row that sees nothing is not defined)
    some = shared.any(-1).unsqueeze(-1)  # [B, 1 or H, 1]
    lse_p = torch.where(some, lse_p, -math.inf)
    lse = torch.logaddexp(lse_p, lse_w)
    weight = lambda part: (part - lse).exp().unsqueeze(-1)
    out = torch.where(some.unsqueeze(-1), out_p * weight(lse_p), 0.0) + out_w * weight(lse_w)
    return out, lse
