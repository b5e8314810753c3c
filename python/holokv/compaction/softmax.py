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



def chunk_logits(q, k, bias, mask, scale, s: int, e: int):
    """:func:`logits` of rows q against entries s..e of k (bias, mask alike), the entries in q's dtype."""
    return logits(q, k[..., s:e, :].to(q.dtype), None if bias is None else bias[..., s:e].to(q.dtype),
                  None if mask is None else mask[..., s:e], scale)


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
        part = chunk_logits(q, k, bias, mask, scale, s, e)
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



def entropy_chunked(q, k, bias=None, mask=None, scale=None, chunk: int = 1024):
    """The entropy (nats) of each row's softmax attention (as in :func:`attend_chunked`: rows q [..., m, d] in the
    working precision, k [..., n, d] of any float dtype converted a chunk at a time) -> [..., m]: H = lse − Σ p·l,
    the log-partition from one pass and the mean logit from a second, so no [m, n] matrix is made whole. A row
    that sees nothing gets NaN."""
    lse = attend_chunked(q, k, None, bias, mask, scale, chunk)[1]
    mean = 0
    for s in range(0, k.shape[-2], chunk):
        part = chunk_logits(q, k, bias, mask, scale, s, s + chunk)
        mean = mean + torch.where(part == -math.inf, 0.0, (part - lse.unsqueeze(-1)).exp() * part).sum(-1)
    return lse - mean


def attend_before(q, k, v, bias, first, scale=None):
    """Attention of rows q [B, H, rows, d] over each sequence's entries [0, first) -> (out [B, H, rows, d], lse
    [B, H, rows]) in q's dtype; lse -inf and out 0 where a sequence has none. k, v [B, H, W, d] in the cache's
    dtype, bias [B, H, W] or None, first [B] int64.

    On CUDA with a 16-bit cache this is one fused pass: the memory-efficient SDPA kernel, which returns the
    log-partition (the rows are rounded to the cache's dtype for it), with the bias and the mask as one
    row-broadcast additive bias; elsewhere chunk by chunk (:func:`attend_chunked`). Nothing the size of the cache
    is made in fp32. The rest of the entries (a window the caller reads itself) joins by :func:`merge`.
    """
    B, H, rows, d = q.shape
    W, dev = k.shape[2], k.device
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    fused = k.is_cuda and k.dtype in (torch.float16, torch.bfloat16)
    dtype = k.dtype if fused else q.dtype
    seen = torch.arange(W, device=dev) < first.view(B, 1)  # [B, W]
    # the bias, -inf where masked; its row stride padded to 16 elements (the fused kernel reads aligned vectors)
    prefix = torch.empty(B, H, 1, W + (-W % 16), dtype=dtype, device=dev)[..., :W]
    prefix[:, :, 0] = torch.where(seen[:, None], 0.0 if bias is None else bias.to(dtype), -math.inf)
    if fused:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q.to(dtype), k, v, prefix.expand(B, H, rows, W), True, scale=scale)[:2]
        out, lse = out.to(q.dtype), lse[..., :rows].to(q.dtype)
    else:
        out, lse = attend_chunked(q, k, v, prefix[:, :, 0], None, scale)
    some = seen.any(-1).view(B, 1, 1)  # the fused kernel's output for a row that sees nothing is not defined
    return torch.where(some.unsqueeze(-1), out, 0.0), torch.where(some, lse, -math.inf)


def merge(*parts):
    """Attention over disjoint parts of the entries -> (out, lse) over all of them, each part (out [..., d],
    lse [...]) with lse -inf where a row sees none of it."""
    lse = parts[0][1]
    for _, part in parts[1:]:
        lse = torch.logaddexp(lse, part)
    out = sum(torch.where(torch.isfinite(part).unsqueeze(-1), o * (part - lse).exp().unsqueeze(-1), 0.0)
              for o, part in parts)
    return out, lse
