"""One-shot compaction of a prompt's KV cache (the prefill path)."""
from __future__ import annotations

import torch

from .softmax import CompactKV, attend_chunked, pool_gqa
from .scores import attention_mass, protect_mask, seed_score, split, take
from .linalg import top_subspace
from .summarize import summarize_bins

METHODS = ("evict", "seed", "softmax_ls")
BIN_ORDERS = ("position", "key", "tree")  # what puts evicted tokens side by side in a bin


def entry_elems(method: str, head_dim: int) -> int:
    """Stored elements per cache entry: K and V, plus the log-mass for softmax_ls."""
    return 2 * head_dim + (method == "softmax_ls")


def plan(n: int, budget: int, *, method: str, head_dim: int, bin_size: int, rank: int):
    """Static sizes (n_keep, n_bins) that fit ``budget`` token-equivalents (2·d elements each).

    Centroids cost an entry each (``rank`` per bin), the bins partition the n − n_keep
    evicted tokens; n_keep is the largest count whose total fits (:func:`fit`). Plain
    Python ints so that compaction has static shapes and never syncs.
    """
    if n <= budget:  # nothing evicted: no centroids, no log-mass to store
        return n, 0
    cap = budget * 2 * head_dim // entry_elems(method, head_dim)
    if method == "evict":
        return cap, 0
    return fit(n, cap, bin_size=bin_size, rank=rank)


def fit(n: int, cap: int, *, bin_size: int, rank: int):
    """(n_keep, n_bins): the most of n tokens kept exact when the other n − n_keep go, in bins of
    ``bin_size``, to ``rank`` entries per bin and everything fits ``cap`` entries.

    Closed form of the largest n_keep with n_keep + ⌈(n − n_keep)/bin_size⌉·rank ≤ cap: each full bin
    frees bin_size − rank entries, so over = n − cap needs ⌈over/(bin_size − rank)⌉ bins.
    """
    over = n - cap
    if over <= 0:
        return n, 0
    n_keep = cap - rank * -(-over // (bin_size - rank))
    if n_keep < 0:
        raise ValueError(f"{cap} entries cannot hold one centroid per bin")
    return n_keep, -(-(n - n_keep) // bin_size)


def by_keys(k, evict, n_bins: int, bin_size: int, depth: int, subspace: str = "iter") -> torch.Tensor:
    """``evict`` [B, Hkv, E] reordered so that alike keys share bins: sorted by their keys' projection on the
    top principal direction of the (centered) keys, then each half, in whole bins, sorted the same way on its own
    direction, ``depth`` levels down (balanced PCA bisection: a bin ends up a cell of the keys' space rather
    than a slab along one direction). Static shapes: every split is a Python int."""
    if depth == 0 or n_bins <= 1:
        return evict
    x = take(k, evict).float()
    x = x - x.mean(-2, keepdim=True)
    evict = evict.gather(-1, (x @ top_subspace(x, 1, method=subspace)[0]).squeeze(-1).argsort(-1))
    half = n_bins // 2
    cut = half * bin_size
    return torch.cat([by_keys(k, evict[..., :cut], half, bin_size, depth - 1, subspace),
                      by_keys(k, evict[..., cut:], n_bins - half, bin_size, depth - 1, subspace)], -1)


def compact(q_obs, k, v, *, budget: int, method: str = "softmax_ls", score="seed", row_entropy=None,
            lam: float = 0.5, bin_size: int = 64, rank: int = 4, n_sink: int = 4, n_recent: int = 32,
            ridge: float = 1.0, shrink_to: str = "window", scale=None, subspace: str = "iter",
            q_future=None, bin_order: str = "position", mass: str = "fit") -> tuple[CompactKV, torch.Tensor]:
    """Compress a prompt's keys/values to ``budget`` token-equivalents of storage.

    q_obs [B, Hq, w, d]: queries of the last w prompt tokens (observation window,
    w <= n_recent); k, v [B, Hkv, N, d] post-RoPE. ``score``: "seed"
    (window mass − λ·row_entropy, needs row_entropy [B, Hkv, N] from
    :func:`~holokv.compaction.selection.causal_stats`), "mass" (SnapKV window mass) or a
    precomputed [B, Hkv, N] tensor (e.g. H2O accumulated mass). Sinks and the
    recent window are always kept. ``method``: "evict" drops the rest, "seed" and
    "softmax_ls" summarize the evicted tokens, in position order (``bin_order="position"``) or ordered by
    their keys (:func:`by_keys`; ``"key"``: by the projection on the evicted keys' top principal direction,
    ``"tree"``: then each half on its own, down to single bins: similar keys share a bin, where a summary's
    second-order fit holds better), into bins of ``bin_size`` with ``rank`` centroids each (softmax_ls:
    sigma-point PCA by ``subspace``, see :func:`~holokv.compaction.summarize.sigma_point_keys`; ``ridge`` and
    ``shrink_to``: the value fit's, ``mass`` the log-masses', see
    :func:`~holokv.compaction.summarize.softmax_ls_centroids`).

    q_future [B, Hq, m, d] (optional): queries standing for ones asked after the prompt; they join the window's
    as rows the summaries are fitted for (not the scores), seeing every entry.

    Returns (CompactKV with entries [kept in position order, centroids], info [B, Hkv]
    of the batched solves, 0 = ok; check it with linalg.check_info off the hot path).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}")
    if bin_order not in BIN_ORDERS:
        raise ValueError(f"bin_order must be one of {BIN_ORDERS}, got {bin_order!r}")
    B, Hkv, N, d = k.shape
    w = q_obs.shape[2]
    n_keep, n_bins = plan(N, budget, method=method, head_dim=d, bin_size=bin_size, rank=rank)
    if isinstance(score, str):
        mass = attention_mass(q_obs, k, scale)
        score = seed_score(mass, row_entropy, lam) if score == "seed" else mass
    pos = torch.arange(N, device=k.device)
    keep, evict = split(score, n_keep, protect_mask(pos, n_sink, N - n_recent))
    k_keep, v_keep = take(k, keep), take(v, keep)
    info = torch.zeros(B, Hkv, dtype=torch.int32, device=k.device)
    lens = torch.full((B,), n_keep + n_bins * rank, device=k.device)
    if n_bins == 0:
        return CompactKV(k_keep, v_keep, k.new_zeros(B, Hkv, n_keep), lens), info

    if bin_order != "position":
        evict = by_keys(k, evict, n_bins, bin_size, 1 if bin_order == "key" else n_bins, subspace)
    pad = n_bins * bin_size - evict.shape[-1]  # last bin is partial: pad with zero-mass entries
    bins = lambda x: torch.cat([take(x, evict), x.new_zeros(B, Hkv, pad, d)], 2).view(B, Hkv, n_bins, bin_size, d)
    k_bins, v_bins = bins(k), bins(v)
    b_bins = torch.zeros(B, Hkv, n_bins * bin_size, dtype=k.dtype, device=k.device)
    b_bins[..., evict.shape[-1]:] = torch.finfo(k.dtype).min
    b_bins = b_bins.view(B, Hkv, n_bins, bin_size)
    q_ref = pool_gqa(q_obs, Hkv)
    q_pos = (N - w + torch.arange(w, device=k.device)).repeat(q_ref.shape[2] // w)
    mask = keep.unsqueeze(-2) <= q_pos[:, None]  # kept tokens may follow some window queries
    if q_future is not None:
        q_ref = torch.cat([q_ref, pool_gqa(q_future, Hkv)], 2)
        mask = torch.cat([mask, mask.new_ones(B, Hkv, q_ref.shape[2] - mask.shape[2], n_keep)], 2)
    context = attend_chunked(q_ref, k_keep, v_keep, None, mask, scale) if method == "softmax_ls" else None
    kc, vc, bc, info = summarize_bins(method, q_ref, context, k_bins, v_bins, b_bins, rank, ridge, scale, subspace,
                                      shrink_to, mass)
    return CompactKV(torch.cat([k_keep, kc], 2), torch.cat([v_keep, vc], 2),
                     torch.cat([k.new_zeros(B, Hkv, n_keep), bc], 2), lens), info
