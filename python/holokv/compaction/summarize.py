"""Turn a bin of evicted entries into a few centroid (key, value, log-mass) entries.

A bin is ``n`` entries k, v [..., n, d] with log-mass bias [..., n] (0 for plain
tokens, >0 for centroids that were evicted again). Reference queries q_ref
[..., m, d] are the rows the summary is fitted for (observation window, GQA
group pooled). Everything is batched over the leading dims (batch, head, bin).
"""
from __future__ import annotations

import math

import torch

from .softmax import attend, logits
from .linalg import ridge_solve, top_subspace, truncated_svd


def seed_centroids(q_ref, k_bin, v_bin, b_bin, rank: int, scale=None):
    """The source method's summary (Selection-Reconstruction-Compression).

    O_bin = softmax(scale·q_ref k_binᵀ + b_bin) v_bin   [..., m, d]
    W     = argmin ‖q_ref W − O_bin‖²  (OLS, d x d; minimal ridge floor for rank-deficient q_ref)
    W ≈ U_r Σ_r V_rᵀ  ->  k_c = U[:, i]·√σ_i,  v_c = Vᵀ[i, :]·√σ_i,  i < rank

    so that the *linear* read-out Σ_c (q·k_c) v_c ≈ q W ≈ O_bin. The centroids get
    no log-mass (bias 0) and are later read through softmax like any token: the
    mismatch the softmax_ls method fixes.
    Returns (k_c [..., rank, d], v_c [..., rank, d], info [...]).
    """
    o_bin, _ = attend(q_ref, k_bin, v_bin, b_bin, scale=scale)
    w, info = ridge_solve(q_ref.expand(*o_bin.shape[:-1], q_ref.shape[-1]), o_bin)
    u, s, vh = truncated_svd(w, rank)
    root = s.sqrt()
    return (u * root.unsqueeze(-2)).mT, vh * root.unsqueeze(-1), info


def sigma_point_keys(k_bin, b_bin, n_c: int, subspace: str = "iter"):
    """Centroid keys that match the bin's key mean and top covariance (unscented transform).

    With mass weights w = softmax(b_bin), mean μ and covariance C = Σ w (k−μ)(k−μ)ᵀ
    ≈ Σ_{i<p} λ_i u_i u_iᵀ (top-p PCA, p = n_c // 2), the n_c equal-weight points
    μ ± sqrt(n_c/2 · λ_i)·u_i (plus μ itself when n_c is odd) have exactly that mean
    and covariance. Because log E_w[exp(s q·k)] = s q·μ + s²/2 qᵀCq + O(s³), the
    points reproduce the bin's log-partition function for every query to second
    order, not just for the reference queries. ``subspace`` is the
    :func:`~holokv.compaction.linalg.top_subspace` method of the PCA: "iter" (block subspace
    iteration, the default: several times faster on the GPU) or "eigh" (exact).
    Returns (k_c [..., n_c, d], log-mass prior [..., n_c] = logsumexp(b_bin) − log n_c).
    """
    w = torch.softmax(b_bin, -1).unsqueeze(-1)
    mu = (w * k_bin).sum(-2, keepdim=True)
    p = n_c // 2
    pts = [mu] if n_c % 2 else []
    if p:
        basis, sig = top_subspace(w.sqrt() * (k_bin - mu), p, method=subspace)
        off = (basis * (sig * math.sqrt(n_c / 2)).unsqueeze(-2)).mT  # [..., p, d]
        pts += [mu + off, mu - off]
    log_mass = torch.logsumexp(b_bin, -1, keepdim=True) - math.log(n_c)
    return torch.cat(pts, -2), log_mass.expand(*b_bin.shape[:-1], n_c)


def softmax_ls_centroids(q_ref, context, k_bins, v_bins, b_bins, n_c: int, ridge: float = 1.0, scale=None,
                         subspace: str = "iter", shrink_to: str = "window", mass: str = "fit", bins=None):
    """Summaries fitted to what softmax attention computes.

    Shapes: q_ref [B, H, m, d]; the kept context (every entry the reference queries see besides the bins)
    enters only through ``context`` = (o_ctx [B, H, m, d], lse_ctx [B, H, m]), the reference queries'
    attention output over it and its log-partition, so the caller reads it however suits its size
    (:func:`~holokv.compaction.softmax.attend_chunked`, or :func:`~holokv.compaction.softmax.attend_before` and
    :func:`~holokv.compaction.softmax.merge`);
    bins k_bins, v_bins [B, H, nb, n, d], b_bins [B, H, nb, n] (padding: bias = dtype min). Bins are older
    than every reference query, so all of them are visible to all rows.

    1. Keys: :func:`sigma_point_keys` per bin, n_c per bin (PCA by ``subspace``).
    2. Log-mass: prior logsumexp(b_bin) − log n_c, then (``mass="fit"``) one shift per bin,
       δ_b = Σ_q ρ_qb (LSE_bin(q) − LSE_centroids(q)) / Σ_q ρ_qb, the least-squares
       fit of the log-partition error weighted by ρ_qb = the bin's share of query
       q's full attention (where the bin matters). ``mass="prior"`` keeps the prior: the shift fits the
       reference queries and can make a bin claim more than its share from a query unlike them (a question
       asked after compression: bench/results/eval_cpu_src_mass_tune/).
    3. Values: with A = softmax(logits over [kept ∪ centroids]) for the reference
       queries and O = exact softmax attention over [kept ∪ all bins],

           V_c = argmin ‖A_c V_c − (O − A_kept V_kept)‖² + λ‖V_c − V_0‖²,

       λ = ridge · mean(diag A_cᵀA_c); V_0, what ``ridge`` shrinks toward and where
       unconstrained directions fall back to instead of 0, is per bin (``shrink_to``)
       "window": its bin-local attention output averaged over the reference queries,
       ρ-weighted, or "mean": its plain mass-weighted mean value softmax(b_bin)·v_bin,
       which does not depend on the reference queries. All bins' values are solved
       jointly because they share one softmax. With m <= nb·n_c reference rows and
       ridge -> 0 the reference outputs are reproduced exactly.
    ``bins`` (a tensor, default all): how many bins are real, the others padding whose entries' bias is
    dtype min (so that a step of static shape fits however many bins it has): they take no share ρ and their
    centroids no attention, so the real bins get what they get alone.
    Returns (k_c, v_c [B, H, nb·n_c, d], bias_c [B, H, nb·n_c], info [B, H]).
    """
    B, H, nb, n, d = k_bins.shape
    kc, bc = sigma_point_keys(k_bins, b_bins, n_c, subspace)  # [B, H, nb, n_c, d], [B, H, nb, n_c]
    q5 = q_ref.unsqueeze(2)  # [B, H, 1, m, d]
    l_bin = logits(q5, k_bins, b_bins, scale=scale)  # [B, H, nb, m, n]
    l_c = logits(q5, kc, bc, scale=scale)  # [B, H, nb, m, n_c]
    o_ctx, lse_ctx = context
    lse_bin = l_bin.logsumexp(-1)  # [B, H, nb, m]
    lse_all = torch.cat([lse_ctx.unsqueeze(2), lse_bin], 2).logsumexp(2)  # [B, H, m]
    rho = (lse_bin - lse_all.unsqueeze(2)).exp()
    if mass == "fit":
        lse_c = l_c.logsumexp(-1)
        shift = (rho * (lse_bin - lse_c)).sum(-1) / rho.sum(-1).clamp_min(torch.finfo(rho.dtype).tiny)
        bc = bc + shift.unsqueeze(-1)
        l_c = l_c + shift[..., None, None]
    l_c = l_c.transpose(2, 3).flatten(3)  # [B, H, m, nb·n_c]

    # The exact target O is assembled from its parts, each bin's local output weighted by its share ρ,
    # rather than as one softmax over [kept ∪ all bins] (an [m, Nk + nb·n] matrix and a long GEMM).
    o_bin = torch.softmax(l_bin, -1) @ v_bins  # [B, H, nb, m, d]
    lse_a = torch.cat([lse_ctx.unsqueeze(-1), l_c], -1).logsumexp(-1)  # softmax over [kept ∪ centroids]
    a_c = (l_c - lse_a.unsqueeze(-1)).exp()
    o_share = rho.unsqueeze(-1) * o_bin  # each bin's part of the exact output
    if shrink_to == "mean":
        v0 = (torch.softmax(b_bins, -1).unsqueeze(-2) @ v_bins).squeeze(-2)
    else:
        v0 = o_share.sum(-2) / rho.sum(-1, keepdim=True).clamp_min(torch.finfo(rho.dtype).tiny)
    v0 = v0.unsqueeze(3).expand(B, H, nb, n_c, d).flatten(2, 3)
    # residual O − A_kept V_kept − A_c V_0; the kept entries' two weights differ by a factor per row
    kept_gap = (lse_ctx - lse_all).exp() - (lse_ctx - lse_a).exp()
    resid = kept_gap.unsqueeze(-1) * o_ctx + o_share.sum(2) - a_c @ v0
    delta, info = ridge_solve(a_c, resid, ridge, None if bins is None else bins * n_c)
    return kc.flatten(2, 3), v0 + delta, bc.flatten(2, 3), info


def summarize_bins(method: str, q_ref, context, k_bins, v_bins, b_bins, rank: int, ridge: float = 1.0,
                   scale=None, subspace: str = "iter", shrink_to: str = "window", mass: str = "fit", bins=None):
    """``rank`` centroids per bin by ``method``: "seed" (:func:`seed_centroids`, bias 0, ``context`` unused:
    None will do) or "softmax_ls" (:func:`softmax_ls_centroids`, fitted with the kept context's
    (o_ctx, lse_ctx) = ``context``, sigma-point PCA by ``subspace``, values shrunk toward ``shrink_to``, log-masses
    by ``mass``). ``bins`` (a tensor, default all): how many of the nb bins are real (the rest padding, see
    :func:`softmax_ls_centroids`; their centroids are garbage, their failures not counted).

    q_ref [B, H, m, d] pooled reference queries; bins k/v_bins [B, H, nb, n, d], b_bins [B, H, nb, n].
    Returns (k_c, v_c [B, H, nb·rank, d], bias_c [B, H, nb·rank], info [B, H] int32, 0 = ok).
    """
    if method == "seed":
        kc, vc, info = seed_centroids(q_ref.unsqueeze(2), k_bins, v_bins, b_bins, rank, scale)
        failed = info != 0
        if bins is not None:
            failed &= torch.arange(info.shape[-1], device=info.device) < bins
        return (kc.flatten(2, 3), vc.flatten(2, 3), kc.new_zeros(kc.shape[:2] + (kc.shape[2] * rank,)),
                failed.sum(-1, dtype=torch.int32))
    return softmax_ls_centroids(q_ref, context, k_bins, v_bins, b_bins, rank, ridge, scale, subspace, shrink_to,
                                mass, bins)
