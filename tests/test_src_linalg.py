"""holokv.compaction.linalg against float64 torch.linalg, and on degenerate inputs."""
import pytest
import torch

from holokv.compaction.linalg import check_info, ridge_solve, top_subspace, truncated_svd


def well_conditioned(*batch, m=48, n=16, lo=1.0, hi=10.0, seed=0):
    """Random [*batch, m, n] matrices with singular values spread over [lo, hi] (distinct: clear gaps)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(*batch, m, n, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(*batch, n, n, generator=g, dtype=torch.float64)).Q
    return u @ torch.diag_embed(torch.linspace(hi, lo, n, dtype=torch.float64).expand(*batch, n)) @ v.mT


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("method", ["eigh", "iter"])
@pytest.mark.parametrize("wide", [False, True])
def test_top_subspace_matches_svd(method, wide):
    """wide: fewer rows than columns (a 12-token bin of 16-dim keys), solved through the row Gram.
    The spectrum is linear from 10 down to 1 (a slow decay for "iter": σ_2r+1/σ_r = 0.6 here)."""
    x = well_conditioned(3, 5, m=16, n=12).mT if wide else well_conditioned(3, 5)
    r = 4
    # "iter" converges like (σ_2r+1/σ_r)^(2·n_iter) = 0.4^n_iter here: 16 steps for a 1e-4 subspace
    basis, sigma = top_subspace(x.float(), r, method=method, n_iter=16)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    assert basis.shape == (3, 5, 16, r) and sigma.shape == (3, 5, r)
    assert rel(sigma, s[..., :r]) < 1e-4
    assert rel(basis @ basis.mT, vh[..., :r, :].mT @ vh[..., :r, :]) < 1e-4
    if method == "iter":  # the default 3 steps: the energy captured (what a PCA is for) is nearly optimal already
        basis, _ = top_subspace(x.float(), r, method=method)
        energy = (x.float() @ basis).square().sum((-2, -1)) / s[..., :r].square().sum(-1)
        assert (energy > 0.995).all() and (energy < 1 + 1e-5).all()


def test_truncated_svd_is_best_rank_r():
    a = well_conditioned(4, m=16, n=16)
    u, s, vh = torch.linalg.svd(a)
    r = 5
    uf, sf, vhf = truncated_svd(a.float(), r)
    assert rel(uf @ torch.diag_embed(sf) @ vhf, u[..., :r] * s[..., None, :r] @ vh[..., :r, :]) < 1e-4
    # the documented sign convention: each U column's largest-magnitude entry is positive
    assert (uf.gather(-2, uf.abs().argmax(-2, keepdim=True)) > 0).all()


@pytest.mark.parametrize("m,n", [(48, 16), (16, 48)])
def test_ridge_solve_matches_float64(m, n):
    """Tall a goes through the primal n-square system, wide a through the m-square dual: same objective."""
    a = well_conditioned(2, 3, m=m, n=n) if m >= n else well_conditioned(2, 3, m=n, n=m).mT
    b = torch.randn(2, 3, m, 7, dtype=torch.float64)
    floor = 16 * n * torch.finfo(torch.float32).eps  # the documented float32 stability floor
    for ridge in (0.0, 0.1):
        x, info = ridge_solve(a.float(), b.float(), ridge)
        check_info(info)
        assert x.shape == (2, 3, n, 7)
        lam = (ridge + floor) * (a.mT @ a).diagonal(dim1=-2, dim2=-1).mean(-1)
        ref = torch.linalg.solve(a.mT @ a + lam[..., None, None] * torch.eye(n, dtype=a.dtype), a.mT @ b)
        assert rel(x, ref) < 1e-4
    if m >= n:  # ridge 0 is ordinary least squares up to that floor
        assert rel(ridge_solve(a.float(), b.float())[0], torch.linalg.lstsq(a, b).solution) < 2e-3
    else:  # ... and the minimum-norm solution of an underdetermined system
        assert rel(ridge_solve(a.float(), b.float())[0], torch.linalg.pinv(a) @ b) < 2e-3


@pytest.mark.parametrize("rows", [32, 8])  # 8 < 16 columns: the row-Gram subspace and the dual solve
@pytest.mark.parametrize("kind", ["zeros", "duplicates", "rank1"])
def test_degenerate_inputs_are_finite(kind, rows):
    x = torch.randn(6, rows, 16)
    if kind == "zeros":
        x = torch.zeros_like(x)
    elif kind == "duplicates":
        x = x[:, :1].expand_as(x).clone()
    else:
        x = torch.randn(6, rows, 1) * torch.randn(6, 1, 16)
    b = torch.randn(6, rows, 8)
    sol, info = ridge_solve(x, b)
    check_info(info)
    for method in ("eigh", "iter"):
        basis, sigma = top_subspace(x, 4, method=method)
        assert torch.isfinite(basis).all() and torch.isfinite(sigma).all()
    u, s, vh = truncated_svd(x.mT @ x, 4)
    assert all(torch.isfinite(t).all() for t in (sol, u, s, vh))
    if kind == "zeros":
        assert (sol == 0).all() and (u == 0).all()
    elif rows >= 16:  # the rank-deficient fit still explains b as well as exact least squares does
        best = torch.linalg.lstsq(x.double(), b.double(), rcond=1e-5, driver="gelsd").solution
        assert rel(x @ sol, x.double() @ best) < 1e-3
    else:  # the dual solve of a rank-deficient wide x is accurate once the ridge is real (documented)
        sol, info = ridge_solve(x, b, 0.1)
        xd = x.double()
        lam = (0.1 + 16 * 16 * torch.finfo(torch.float32).eps) * xd.square().sum((-2, -1)) / 16
        ref = torch.linalg.solve(xd.mT @ xd + lam[:, None, None] * torch.eye(16, dtype=xd.dtype), xd.mT @ b.double())
        assert (info == 0).all() and rel(sol, ref) < 1e-4
