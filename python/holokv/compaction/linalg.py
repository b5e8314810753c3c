"""Batched small dense linear algebra for SRC compression.

Every function works on a leading batch of independent problems (layers x heads x
bins flattened or not: any ``...`` prefix) and never synchronizes with the host:
no ``.item()``, no Python branching on tensor values. Failures are reported as an
``info`` tensor (0 = ok) that the caller checks once, after the compression path,
with :func:`check_info`.

The bodies are GEMMs plus a small symmetric factorization (``eigh`` of the smaller
Gram matrix, Cholesky of the smaller side of the ridge normal equations) because
that is what is fast on GPUs for sizes <= 128 and thousands of problems. On float32 CUDA tensors the factorizations
run in the cuSOLVER-backed :func:`holokv.batched_eigh` and
:func:`holokv.batched_cholesky_solve` (one batched call, no host sync; for d > 32
``torch.linalg.eigh`` loops over the matrices); elsewhere in ``torch.linalg``.

Rank-deficient inputs (duplicate rows, zero bins) give finite results: singular
directions with zero singular value come back with zero vectors where they are
derived by division (see :func:`top_subspace`, :func:`truncated_svd`), and the ridge
solve always adds a floor to the diagonal (see :func:`ridge_solve`).
"""
from __future__ import annotations

import torch

from ..ops import batched_cholesky_solve, batched_eigh


def _cusolver(t: torch.Tensor) -> bool:
    """Whether t's factorizations go through the batched cuSOLVER ops (float32 CUDA only)."""
    return t.is_cuda and t.dtype == torch.float32


def _gram_eigh(g: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-r eigenpairs of symmetric PSD ``g`` [..., d, d], largest first."""
    if _cusolver(g):
        d = g.shape[-1]
        evals, evecs, info = batched_eigh(g.reshape(-1, d, d).contiguous())
        # a failed solve (non-finite g) gives NaN rather than raising, which would sync
        evals = evals.masked_fill((info != 0).unsqueeze(-1), float("nan"))
        evals, evecs = evals.reshape(g.shape[:-1]), evecs.reshape(g.shape)
    else:
        evals, evecs = torch.linalg.eigh(g)
    return evals.flip(-1)[..., :r].clamp_min(0), evecs.flip(-1)[..., :r]


def _inv_sigma(s: torch.Tensor, n: int) -> torch.Tensor:
    """1/s, with 0 where s is below ``eps · n · s_max`` (rank deficiency) instead of dividing by ~0."""
    tol = torch.finfo(s.dtype).eps * n * s[..., :1]
    return torch.where(s > tol, 1.0 / s.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(s))


def _with_floor(g: torch.Tensor, mean_sq: torch.Tensor, n: int | torch.Tensor, ridge: float | torch.Tensor = 0.0
                ) -> torch.Tensor:
    """g + λI with λ = (ridge + 16·n·eps)·mean_sq + tiny (mean_sq: the mean squared column norm behind g):
    the relative floor that keeps the Cholesky factorization of a rank-deficient Gram matrix positive
    definite in the working precision, and gives an all-zero Gram a finite factor."""
    finfo = torch.finfo(g.dtype)
    lam = (ridge + 16 * n * finfo.eps) * mean_sq + finfo.tiny
    return g + lam[..., None, None] * torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)


def _start_block(n: int, p: int, like: torch.Tensor) -> torch.Tensor:
    """A fixed pseudo-random ±1 [n, p] block (an integer hash of (row, column)): identical on every device,
    so that CPU and CUDA iterate from the same start, and capturable in a CUDA graph (no RNG state)."""
    h = torch.arange(n, device=like.device)[:, None] * 0x9E3779B1 + torch.arange(p, device=like.device) * 0x85EBCA77
    h = ((h ^ (h >> 15)) & 0xFFFFFFFF) * 0x2C1B3C6D  # < 2^62: no int64 overflow
    return (1 - 2 * ((h >> 16) & 1)).to(like.dtype)


def _orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning y [..., n, p] by Cholesky QR: yᵀy = LLᵀ, q = y L⁻ᵀ (a Gram matrix and two
    small batched factorizations instead of Householder QR, which torch loops over matrix by matrix on CUDA).
    y is first scaled to unit norm (the span is unchanged), so that blocks of tiny entries (a bin of
    duplicate keys has ~eps-sized centered keys) do not underflow; then a diagonal floor relative to the
    mean squared column norm keeps rank-deficient blocks finite: their null directions come back as
    near-zero columns, and an all-zero y as zeros."""
    finfo = torch.finfo(y.dtype)
    y = y / y.norm(dim=(-2, -1), keepdim=True).clamp_min(finfo.tiny)
    s = y.mT @ y
    chol, _ = torch.linalg.cholesky_ex(_with_floor(s, s.diagonal(dim1=-2, dim2=-1).mean(-1), s.shape[-1]))
    return torch.linalg.solve_triangular(chol, y.mT, upper=False).mT


def _subspace_iteration(g: torch.Tensor, r: int, n_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate top-r eigenpairs of symmetric PSD g [..., m, m]: block power iteration with a block of
    2r columns (Halko et al. 2011, Alg. 4.4; the extra r columns speed convergence), then Rayleigh-Ritz."""
    m = g.shape[-1]
    y = g @ _start_block(m, min(m, 2 * r), g)
    for _ in range(n_iter):
        y = g @ _orthonormalize(y)
    q = _orthonormalize(_orthonormalize(y))  # twice: Cholesky QR is orthonormal to ~cond(y)²·eps after one pass
    evals, small = _gram_eigh(q.mT @ g @ q, r)
    return evals, q @ small


def top_subspace(x: torch.Tensor, r: int, *, method: str = "eigh", n_iter: int = 3
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-r right singular subspace of the rows of ``x``.

    x [..., n, d] -> (basis [..., d, r], sigma [..., r] descending), so that
    ``x ≈ (x @ basis) @ basis.mT`` is the best rank-r approximation.

    Both methods work on the smaller Gram matrix: xᵀx, or for wide x (r <= n < d, e.g.
    a bin of 64 tokens with d = 128) x xᵀ = U Σ² Uᵀ and basis = xᵀ U Σ⁻¹, which is 8x
    fewer eigensolver flops there. Squaring doubles the condition number, which only
    hurts the trailing singular values we discard. Directions with zero singular value
    (rank-deficient x) come back as zero columns in the wide case.
    ``method="eigh"``: a full symmetric eigendecomposition of that Gram (exact).
    ``method="iter"``: ``n_iter`` steps of block subspace iteration with 2r columns
    from a fixed start, Cholesky-QR orthonormalized, then Rayleigh-Ritz through a
    2r-square ``eigh`` (which cuSOLVER batches by Jacobi up to 2r = 32): all GEMMs and
    small factorizations, several times faster than "eigh" for 64-square Grams. Its
    error falls like (σ_2r+1 / σ_r)^(2·n_iter): negligible for the quickly decaying
    spectra of attention keys, about 1e-3 relative on σ for white noise (see
    bench/src_linalg.py); the captured energy ‖x basis‖² converges faster still.
    """
    n, d = x.shape[-2:]
    wide = r <= n < d
    g = x @ x.mT if wide else x.mT @ x
    if method == "eigh":
        evals, vecs = _gram_eigh(g, r)
    elif method == "iter":
        evals, vecs = _subspace_iteration(g, r, n_iter)
    else:
        raise ValueError(f"unknown method {method!r}")
    sigma = evals.sqrt()
    if not wide:
        return vecs, sigma
    return (x.mT @ vecs) * _inv_sigma(sigma, d).unsqueeze(-2), sigma


def truncated_svd(a: torch.Tensor, r: int, **kw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-r SVD a ≈ U diag(S) Vh.

    a [..., m, n] -> U [..., m, r], S [..., r], Vh [..., r, n]. Uses
    :func:`top_subspace` for V and U = a V / S; columns with S below
    ``eps · n · S_max`` (rank deficiency) get U = 0 instead of dividing by ~0, so the
    product stays finite and exact up to the dropped directions. Each pair (U column,
    Vh row) is signed so that the U column's largest-magnitude entry is positive:
    solvers differ in the signs they return, and a reader that is not sign-invariant
    (the seed method reads U√S and Vh√S through softmax) would depend on them.
    """
    v, s = top_subspace(a, r, **kw)
    u = (a @ v) * _inv_sigma(s, a.shape[-1]).unsqueeze(-2)
    sign = u.gather(-2, u.abs().argmax(-2, keepdim=True)).sign()
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return u * sign, s, (v * sign).mT


def ridge_solve(a: torch.Tensor, b: torch.Tensor, ridge: float | torch.Tensor = 0.0,
                cols: int | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched ridge least squares via Cholesky of the normal equations.

    a [..., m, n], b [..., m, k] -> (x [..., n, k], info [...] int32, 0 = ok; batch dims
    broadcast) with

        x = argmin ‖a x − b‖² + λ ‖x‖²,   λ = (ridge + 16·n·eps) · mean(diag(aᵀa)) + tiny.

    The regularizer is relative to the mean squared column norm so that ``ridge``
    is unit-free; the ``16·n·eps`` floor keeps the Cholesky factorization of
    rank-deficient systems (duplicate columns, zero rows) positive definite in the
    working precision, and ``tiny`` makes an all-zero ``a`` return x = 0.
    ``ridge`` may be a tensor broadcastable to ``[...]``. ``cols`` (default n, may be a tensor) is how many of
    a's columns count in n and the mean: the rest are padding, all zero, and get x = 0, the others the x of a
    without them.
    With more unknowns than rows (n > m: softmax_ls fits all bins' centroids to a
    few reference queries) the same x comes from the m-square dual system,
    x = aᵀ (a aᵀ + λ I)⁻¹ b, so the factorization costs m³ instead of n³. Its
    rounding error grows like eps·‖a‖²/λ times the part of b outside a's column
    space: none for a of full row rank (the usual underdetermined fit), but a
    rank-deficient wide a needs a real ``ridge`` (SRC's default is 0.03) to stay accurate;
    with the floor alone it is only finite.
    """
    m, n = a.shape[-2:]
    dual = n > m
    # ridge stays a Python float where it is one: a scalar copied to the GPU would sync
    cols = n if cols is None else cols
    g = _with_floor(a @ a.mT if dual else a.mT @ a, a.square().sum((-2, -1)) / cols, cols, ridge)
    rhs = b if dual else a.mT @ b
    s, k = g.shape[-1], rhs.shape[-1]
    batch = torch.broadcast_shapes(g.shape[:-2], rhs.shape[:-2])
    if _cusolver(g):
        y, info = batched_cholesky_solve(g.expand(*batch, s, s).reshape(-1, s, s).contiguous(),
                                         rhs.expand(*batch, s, k).reshape(-1, s, k).contiguous())
        y, info = y.reshape(*batch, s, k), info.reshape(batch)
    else:
        chol, info = torch.linalg.cholesky_ex(g)
        y, info = torch.cholesky_solve(rhs, chol), info.expand(batch)
    return (a.mT @ y if dual else y), info


def check_info(*infos: torch.Tensor) -> None:
    """Raise if any deferred ``info`` is non-zero (this synchronizes: call it off the hot path)."""
    for info in infos:
        if bool((info != 0).any()):
            raise torch.linalg.LinAlgError(f"{int((info != 0).sum())} batched factorizations failed")
