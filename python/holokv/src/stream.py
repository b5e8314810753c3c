"""Streaming SRC: compression while tokens arrive (decoding, or a prompt fed in chunks)."""
from __future__ import annotations

import torch

from .attention import CompactKV, logits, pool_gqa
from .compact import METHODS, entry_elems
from .linalg import check_info
from .selection import entropy, protect_mask, split
from .summarize import summarize_bins


class SRCStream:
    """One layer's streaming compressor, batched over (batch, kv head).

    Tokens arrive through :meth:`update` with their (post-RoPE) queries. Every
    ``every`` tokens a step runs:

    1. the new tokens join the active cache; their queries' attention over it is
       added to each entry's importance (accumulated mass, as H2O) and each new
       token records the entropy of its own attention row;
    2. if the cache exceeds ``budget − rank`` entries (room kept for one bin's
       centroids), the lowest ``importance − λ·entropy`` (score="seed") or
       lowest ``importance`` (score="mass") entries move to the recycle bin;
       sinks and the last ``n_recent`` tokens are never moved;
    3. once the bin holds ``bin_size`` entries, the oldest ``bin_size`` become
       ``rank`` centroids (method "seed" or "softmax_ls", fitted for the last
       ``n_ref`` queries) that join the cache with position -1, the bin's summed
       importance split evenly and its mean entropy, so they compete for eviction
       like tokens (and may be binned and summarized again, with their log-mass).

    Binned entries are not attended until summarized (as in the source method).
    ``budget`` counts entries; bytes per entry are ``entry_elems(method, d)``.
    With every=1, n_sink=n_recent=0, score="seed", method="seed" this is the
    source method as published. method="evict" with score="mass" is H2O.
    ``info`` accumulates solver failures; :meth:`check` raises on them.
    """

    def __init__(self, *, budget: int, method: str = "softmax_ls", score: str = "seed", lam: float = 0.5,
                 bin_size: int = 32, rank: int = 4, n_sink: int = 4, n_recent: int = 32, n_ref: int = 32,
                 every: int = 16, ridge: float = 1.0, scale=None):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}")
        if method != "evict" and not 0 < rank < min(bin_size, budget):
            raise ValueError("need 0 < rank < min(bin_size, budget)")
        self.__dict__.update(budget=budget, method=method, score=score, lam=lam, bin_size=bin_size, rank=rank,
                             n_sink=n_sink, n_recent=n_recent, n_ref=n_ref, every=every, ridge=ridge, scale=scale)
        self.t = 0  # tokens processed by steps
        self.pending = None  # (q, k, v) of tokens not yet stepped
        self.state = None  # k, v [B,H,S,d]; bias, imp, ent, pos [B,H,S]
        self.bin = None  # same fields, [B,H,nb,...]
        self.q_ref = None  # [B,Hq,<=n_ref,d] last queries, positions self.q_pos
        self.info = None

    def entry_elems(self, head_dim: int) -> int:
        return entry_elems(self.method, head_dim)

    def update(self, q, k, v):
        """Add tokens: q [B, Hq, T, d], k/v [B, Hkv, T, d]; runs a step per ``every`` tokens."""
        if self.pending is not None:
            q, k, v = (torch.cat(p, 2) for p in zip(self.pending, (q, k, v)))
        n_steps = q.shape[2] // self.every
        for i in range(n_steps):
            s = slice(i * self.every, (i + 1) * self.every)
            self._step(q[:, :, s], k[:, :, s], v[:, :, s])
        rest = slice(n_steps * self.every, None)
        self.pending = (q[:, :, rest], k[:, :, rest], v[:, :, rest]) if q.shape[2] % self.every else None

    def cache(self) -> CompactKV:
        """Everything attended now: active entries, then not-yet-stepped tokens (bias 0)."""
        k, v, bias = self.state["k"], self.state["v"], self.state["bias"]
        if self.pending is not None:
            _, pk, pv = self.pending
            k, v = torch.cat([k, pk], 2), torch.cat([v, pv], 2)
            bias = torch.cat([bias, bias.new_zeros(pk.shape[:3])], 2)
        return CompactKV(k, v, bias, torch.full((k.shape[0],), k.shape[2], device=k.device))

    def check(self):
        if self.info is not None:
            check_info(self.info)

    def _step(self, q, k, v):
        B, Hq, M, d = q.shape
        H = k.shape[1]
        G = Hq // H
        pos_new = (self.t + torch.arange(M, device=k.device)).expand(B, H, M)
        new = dict(k=k, v=v, bias=k.new_zeros(B, H, M), imp=k.new_zeros(B, H, M), ent=k.new_zeros(B, H, M),
                   pos=pos_new)
        st = new if self.state is None else {f: torch.cat([self.state[f], new[f]], 2) for f in new}
        q_pos = (self.t + torch.arange(M, device=k.device)).repeat(G)
        p = torch.softmax(logits(pool_gqa(q, H), st["k"], st["bias"],
                                 st["pos"].unsqueeze(-2) <= q_pos[:, None], self.scale), -1)
        st["imp"] = st["imp"] + p.sum(-2) / G
        st["ent"][..., -M:] = entropy(p).view(B, H, G, M).mean(2)
        self.t += M
        self.q_ref = q if self.q_ref is None else torch.cat([self.q_ref, q], 2)[:, :, -self.n_ref:]
        self.q_pos = torch.arange(self.t - self.q_ref.shape[2], self.t, device=k.device)

        cap = self.budget if self.method == "evict" else self.budget - self.rank
        S = st["k"].shape[2]
        if S > cap:
            score = st["imp"] - self.lam * st["ent"] if self.score == "seed" else st["imp"]
            keep, out = split(score, cap, protect_mask(st["pos"], self.n_sink, self.t - self.n_recent))
            if self.method != "evict":
                binned = _gather(st, out)
                self.bin = binned if self.bin is None else {f: torch.cat([self.bin[f], binned[f]], 2) for f in st}
            st = _gather(st, keep)
        if self.bin is not None and self.bin["k"].shape[2] >= self.bin_size:
            st = self._summarize(st)
        self.state = st

    def _summarize(self, st):
        n, r = self.bin_size, self.rank
        b = {f: x[:, :, :n] for f, x in self.bin.items()}
        self.bin = {f: x[:, :, n:] for f, x in self.bin.items()}
        q_ref = pool_gqa(self.q_ref, st["k"].shape[1])
        mask = st["pos"].unsqueeze(-2) <= self.q_pos.repeat(q_ref.shape[2] // self.q_pos.shape[0])[:, None]
        kc, vc, bc, info = summarize_bins(self.method, q_ref, st["k"], st["v"], st["bias"], mask,
                                          *(b[f].unsqueeze(2) for f in ("k", "v", "bias")), r, self.ridge, self.scale)
        self.info = (info != 0).int() if self.info is None else self.info + (info != 0).int()
        cent = dict(k=kc, v=vc, bias=bc, imp=(b["imp"].sum(-1, keepdim=True) / r).expand_as(bc),
                    ent=b["ent"].mean(-1, keepdim=True).expand_as(bc), pos=torch.full_like(b["pos"][..., :r], -1))
        return {f: torch.cat([st[f], cent[f]], 2) for f in st}


def _gather(st, idx):
    """Select entries idx [B, H, n] of every field (the d-dim ones along dim 2)."""
    return {f: x.gather(2, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]) if x.dim() == 4 else idx)
            for f, x in st.items()}
