"""Which entries stay exact: per (batch, kv head) scores and the keep/evict split.

Scores are pooled over a GQA group: the G query heads that read one KV head are
treated as G·m rows, and masses are divided by G so that MHA and GQA models are
on the same scale.
"""
from __future__ import annotations

import torch

from .softmax import logits, pool_gqa


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of the last dim; 0·log 0 = 0."""
    return -(probs * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum(-1)


def attention_mass(q, k, scale=None, mask=None, chunk: int = 256):
    """The attention queries pay each entry: SnapKV's window mass, H2O's accumulated mass, Top-K's score.

    q [B, Hq, m, d]: the queries of the last m positions of k's sequence, k [B, Hkv, N, d] -> [B, Hkv, N],
    summed over the queries and averaged over the G query heads of each KV head. ``mask`` [..., m, N]
    (True = visible; e.g. transformers' [B, 1, m, N]) defaults to causal; a query that sees nothing adds
    nothing. Computed in at least fp32, queries in chunks so memory is O(chunk·N).
    """
    B, Hq, m, d = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    dt = torch.promote_types(q.dtype, torch.float32)
    if mask is None:
        pos = torch.arange(N, device=k.device)
        mask = pos <= pos[N - m:, None]
    k, mass = k.to(dt), 0
    for s in range(0, m, chunk):
        vis = torch.cat([mask[..., s: s + chunk, :]] * (Hq // Hkv), -2)  # pooled rows: group after group
        p = torch.softmax(logits(pool_gqa(q[:, :, s: s + chunk].to(dt), Hkv), k, mask=vis, scale=scale), -1)
        mass = mass + p.masked_fill(~vis.any(-1, keepdim=True), 0.0).sum(-2)
    return mass * (Hkv / Hq)


def causal_stats(q, k, scale=None, chunk: int = 256):
    """Statistics of full causal self-attention over a prompt.

    q [B, Hq, N, d], k [B, Hkv, N, d] -> (mass [B, Hkv, N], row_entropy [B, Hkv, N]):
    ``mass[j]`` is the attention all queries give token j (:func:`attention_mass`, H2O's accumulated
    score), ``row_entropy[i]`` the entropy of token i's own attention row (the seed's entropy term),
    averaged over the G query heads of the group. Queries go in chunks so memory is O(chunk·N).
    """
    B, Hq, N, d = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    ent = []
    pos = torch.arange(N, device=q.device)
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        p = torch.softmax(logits(q[:, :, s:e].reshape(B, Hkv, G * (e - s), d), k,
                                 mask=(pos <= pos[s:e, None]).repeat(G, 1), scale=scale), -1)
        ent.append(entropy(p.view(B, Hkv, G, e - s, N)).mean(2))
    return attention_mass(q, k, scale, chunk=chunk), torch.cat(ent, -1)


def seed_score(mass, row_entropy, lam: float = 0.5):
    """The source's eviction score importance − λ·entropy (lowest is evicted first)."""
    return mass - lam * row_entropy


def protect_mask(pos, n_sink: int, recent_start):
    """Entries that must stay exact: sink tokens (pos < n_sink) and the recent window (pos >= recent_start).

    pos [..., N] token positions (centroids carry -1 and are never protected).
    """
    return ((pos >= 0) & (pos < n_sink)) | (pos >= recent_start)


def split(score, n_keep: int, protect=None):
    """Keep the ``n_keep`` highest-scoring entries (protected ones first).

    score [..., N] -> (keep [..., n_keep], evict [..., N - n_keep]) int64 indices,
    each in ascending entry order so positional structure survives. If more than
    ``n_keep`` entries are protected, the highest-scoring protected ones are kept.
    """
    N = score.shape[-1]
    if protect is not None:
        score = score.masked_fill(protect, float("inf"))
    keep = torch.zeros_like(score, dtype=torch.int8).scatter_(-1, score.topk(n_keep, -1).indices, 1)
    perm = torch.argsort(keep, dim=-1, stable=True)  # evicted (0) first, then kept, both in order
    return perm[..., N - n_keep:], perm[..., :N - n_keep]


def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, ...] gathered along N with a per-sequence [B, M] or per-head [B, H, M] index."""
    if index.dim() == 2:
        index = index[:, None].expand(-1, x.shape[1], -1)
    return x.gather(2, index.view(*index.shape, *[1] * (x.dim() - 3)).expand(*index.shape, *x.shape[3:]))
