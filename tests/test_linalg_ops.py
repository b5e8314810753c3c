"""holokv.batched_eigh / batched_cholesky_solve (CPU and CUDA) against float64 torch.linalg."""
import pytest
import torch

import holokv
from holokv.compaction import linalg

from conftest import needs_cuda

CUDA_SHAPES = [(64, 128, 128), (8, 32, 32), (3, 5, 5), (16, 33, 33)]


def spd(batch, n, lo=1.0, hi=10.0, seed=0):
    """Random symmetric [batch, n, n] float64 with eigenvalues spread over [lo, hi] (clear gaps)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(batch, n, n, generator=g, dtype=torch.float64)).Q
    return q @ torch.diag_embed(torch.linspace(lo, hi, n, dtype=torch.float64).expand(batch, n)) @ q.mT


def rel(a, b):
    return ((a.double().cpu() - b).norm() / b.norm()).item()


def check_eigh(a64, device):
    w, v, info = holokv.batched_eigh(a64.float().to(device))
    w_ref, v_ref = torch.linalg.eigh(a64)
    assert w.shape == w_ref.shape and v.shape == a64.shape and info.shape == (a64.shape[0],)
    assert v.stride() == (a64.shape[1] ** 2, 1, a64.shape[1])  # column-major, like torch.linalg.eigh
    assert (info == 0).all()
    assert rel(w, w_ref) < 1e-4
    v = v.double().cpu()
    sign = torch.sign((v * v_ref).sum(-2, keepdim=True))  # eigenvectors are defined up to sign
    assert rel(v * sign, v_ref) < 1e-4


def check_cholesky_solve(a64, k, device):
    b64 = torch.randn(a64.shape[0], a64.shape[1], k, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x, info = holokv.batched_cholesky_solve(a64.float().to(device), b64.float().to(device))
    assert x.shape == b64.shape and (info == 0).all()
    assert rel(x, torch.linalg.solve(a64, b64)) < 1e-4


@pytest.mark.parametrize("shape", [(3, 5, 5), (8, 32, 32), (4, 48, 48), (1, 1, 1)])
def test_eigh_cpu_matches_float64(shape):
    check_eigh(spd(shape[0], shape[1]), "cpu")


@pytest.mark.parametrize("shape,k", [((3, 5, 5), 2), ((8, 32, 32), 1), ((4, 48, 48), 16)])
def test_cholesky_solve_cpu_matches_float64(shape, k):
    check_cholesky_solve(spd(shape[0], shape[1]), k, "cpu")


def only_upper(a):
    """a with its strict lower triangle replaced by garbage (the ops read the upper one)."""
    return a.triu() + torch.full_like(a, 1e3).tril(-1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_reads_upper_triangle(device):
    a = spd(4, 40).float().to(device)
    b = torch.randn(4, 40, 3, device=device)
    w, v, _ = holokv.batched_eigh(a)
    wu, vu, _ = holokv.batched_eigh(only_upper(a))
    assert torch.allclose(w, wu, atol=1e-4) and torch.allclose(vu.abs(), v.abs(), atol=1e-3)
    assert torch.allclose(holokv.batched_cholesky_solve(only_upper(a), b)[0],
                          holokv.batched_cholesky_solve(a, b)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("n", [5, 40])
def test_rank_deficient(device, n):
    x = torch.randn(6, 20, n)
    x[:, :, 1] = x[:, :, 0]  # a duplicate column of x: duplicate rows (and columns) of its Gram matrix
    a = torch.stack([torch.zeros(n, n), *(x.mT @ x)[:5]]).to(device)
    w, v, info = holokv.batched_eigh(a)
    assert (info == 0).all() and torch.isfinite(w).all() and torch.isfinite(v).all()
    eye = torch.eye(n, device=device)
    assert torch.allclose(v.mT @ v, eye.expand_as(v), atol=1e-4)
    assert (w[0].abs() < 1e-6).all() and (w[1:, 0].abs() < 1e-4 * w[1:, -1]).all()  # the null direction

    ones = torch.ones(n, n, device=device)  # duplicate rows, exactly singular: its 2nd pivot is 0
    x, info = holokv.batched_cholesky_solve(torch.stack([a[0], ones]), torch.ones(2, n, 3, device=device))
    assert info[0] == 1 and info[1] > 0 and (x == 0).all()


def test_eigh_failure_is_reported_not_raised():
    a = spd(3, 6).float()
    a[1, 0, 2] = float("nan")
    w, v, info = holokv.batched_eigh(a)
    assert info.tolist() == [0, -1, 0]
    assert torch.isfinite(w[0]).all() and torch.isfinite(w[2]).all() and w[1].isnan().all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("n", [3, 40])  # CUDA: the Jacobi solver (n <= 32) and syevBatched
def test_eigh_reports_nonfinite_input(device, n):
    """A NaN or an inf in the read (upper) triangle gives info -1 and NaN results; the others are solved."""
    a = spd(5, n).float()
    a[1, 1, 1] = float("inf")
    a[2, 0, n - 1] = float("-inf")
    a[3, 2, 2] = float("nan")
    a[4, n - 1, 0] = float("nan")  # the lower triangle is not read
    w, v, info = holokv.batched_eigh(a.to(device))
    assert info.tolist() == [0, -1, -1, -1, 0]
    bad = torch.tensor([False, True, True, True, False], device=device)
    assert w[bad].isnan().all() and v[bad].isnan().all()
    assert torch.isfinite(w[~bad]).all() and torch.isfinite(v[~bad]).all()
    w_ref = torch.linalg.eigh(spd(5, n)[[0, 4]])[0]
    assert rel(w[~bad], w_ref) < 1e-4


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_empty(device):
    w, v, info = holokv.batched_eigh(torch.empty(0, 4, 4, device=device))
    assert w.shape == (0, 4) and v.shape == (0, 4, 4) and info.shape == (0,)
    x, info = holokv.batched_cholesky_solve(torch.eye(3, device=device).expand(2, 3, 3).contiguous(),
                                            torch.empty(2, 3, 0, device=device))
    assert x.shape == (2, 3, 0) and (info == 0).all()


@pytest.mark.parametrize("device", ["cpu", "meta", pytest.param("cuda", marks=needs_cuda)])  # meta: the fakes
def test_errors_name_the_argument(device):
    a = spd(2, 4).float().to(device)
    b = torch.randn(2, 4, 3, device=device)
    eigh, solve = holokv.batched_eigh, holokv.batched_cholesky_solve
    with pytest.raises(RuntimeError, match="a must be float32"):
        eigh(a.double())
    with pytest.raises(RuntimeError, match=r"a must be \[batch, n, n\]"):
        eigh(a[0])
    with pytest.raises(RuntimeError, match=r"a must be \[batch, n, n\] \(square\)"):
        eigh(torch.randn(2, 4, 3, device=device))
    with pytest.raises(RuntimeError, match="a must be contiguous"):
        eigh(a.mT)
    with pytest.raises(RuntimeError, match="b must be float32"):
        solve(a, b.double())
    with pytest.raises(RuntimeError, match=r"b.size\(0\) = 3 must equal the batch of a, 2"):
        solve(a, torch.randn(3, 4, 3, device=device))
    with pytest.raises(RuntimeError, match=r"b.size\(1\) = 5 must equal n"):
        solve(a, torch.randn(2, 5, 3, device=device))
    with pytest.raises(RuntimeError, match="b must be contiguous"):
        solve(a, torch.randn(2, 3, 4, device=device).mT)
    if device == "cuda":
        with pytest.raises(RuntimeError, match="b is on cpu but a is on cuda"):
            solve(a, b.cpu())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_opcheck(device):
    a = spd(3, 5).float().to(device)
    torch.library.opcheck(torch.ops.holokv.batched_eigh.default, (a,))
    torch.library.opcheck(torch.ops.holokv.batched_cholesky_solve.default, (a, torch.randn(3, 5, 2, device=device)))


def test_src_linalg_routing_on_cpu(monkeypatch):
    """linalg.py's op path (reshapes, broadcasting, flips) against its torch.linalg path, run on CPU."""
    x, b = torch.randn(2, 3, 48, 16), torch.randn(2, 3, 48, 7)
    ref = linalg.top_subspace(x, 4), linalg.ridge_solve(x, b, 0.1), linalg.ridge_solve(x[0], b)
    monkeypatch.setattr(linalg, "_cusolver", lambda t: t.dtype == torch.float32)
    got = linalg.top_subspace(x, 4), linalg.ridge_solve(x, b, 0.1), linalg.ridge_solve(x[0], b)
    (basis, s), (basis_r, s_r) = got[0], ref[0]
    assert torch.allclose(s, s_r, rtol=1e-5) and torch.allclose(basis @ basis.mT, basis_r @ basis_r.mT, atol=1e-5)
    for (sol, info), (sol_r, info_r) in zip(got[1:], ref[1:]):
        assert sol.shape == sol_r.shape and info.shape == info_r.shape
        assert torch.allclose(sol, sol_r, rtol=1e-4, atol=1e-5) and (info == 0).all()


# CUDA: the lead's H100 run.


@needs_cuda
@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_cuda_eigh_matches_float64(shape):
    check_eigh(spd(shape[0], shape[1]), "cuda")


@needs_cuda
@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_cuda_cholesky_solve_matches_float64(shape):
    check_cholesky_solve(spd(shape[0], shape[1]), 8, "cuda")


@needs_cuda
@pytest.mark.parametrize("n", [4, 40])
def test_cuda_chunked_batch(n):
    """More matrices than one library call takes (65535): the chunks must tile the batch."""
    batch = 70000 if n == 4 else 66000
    a = (torch.eye(n) * torch.arange(1, n + 1)).expand(batch, n, n).contiguous().cuda()
    a[-1] *= 2
    w, v, info = holokv.batched_eigh(a)
    expect = torch.arange(1, n + 1, device="cuda", dtype=torch.float32)
    assert (info == 0).all() and torch.allclose(w[:-1], expect.expand(batch - 1, n))
    assert torch.allclose(w[-1], 2 * expect)
    x, info = holokv.batched_cholesky_solve(a, a)
    assert (info == 0).all() and torch.allclose(x, torch.eye(n, device="cuda").expand_as(x), atol=1e-5)


@needs_cuda
def test_cuda_ops_do_not_sync():
    a = spd(8, 40).float().cuda()
    b = torch.randn(8, 40, 4, device="cuda")
    holokv.batched_eigh(a), holokv.batched_cholesky_solve(a, b)  # warm up: handles, allocator
    torch.cuda.set_sync_debug_mode("error")
    try:
        holokv.batched_eigh(a)
        holokv.batched_eigh(a[:, :8, :8].contiguous())
        holokv.batched_cholesky_solve(a, b)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
def test_cuda_src_linalg_matches_cpu():
    x = torch.randn(4, 8, 64, 128, generator=torch.Generator().manual_seed(2))
    b = torch.randn(4, 8, 64, 128)
    (basis, s), (basis_c, s_c) = linalg.top_subspace(x.cuda(), 16), linalg.top_subspace(x, 16)
    assert rel(s, s_c.double()) < 1e-4
    assert rel(basis @ basis.mT, (basis_c @ basis_c.mT).double()) < 1e-3
    (sol, info), (sol_c, _) = linalg.ridge_solve(x.cuda(), b.cuda(), 0.1), linalg.ridge_solve(x, b, 0.1)
    assert (info == 0).all() and rel(sol, sol_c.double()) < 1e-4
