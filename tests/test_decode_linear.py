"""decode_linear (x [M <= 16, K] times an nn.Linear weight) against its float64 reference: every row count, weights
whose rows do not fill a block, K not a multiple of a chunk, 16-bit dtypes through the tensor-core kernel and the
others through the plain GEMM; NaN propagates; bad input is named; opcheck; no autograd."""
import pytest
import torch

import holokv
from holokv.reference import decode_linear_ref

from conftest import dtype_id, needs_cuda

ops = torch.ops.holokv
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def inputs(M, N, K, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    w = torch.randn(N, K, generator=g, dtype=torch.float64) / K ** 0.5
    return x.to(dtype).to(device), w.to(dtype).to(device)


def check_close(y, x, w):
    ref = decode_linear_ref(x.cpu(), w.cpu())
    assert y.shape == ref.shape and y.dtype == x.dtype and y.device == x.device
    # one rounding of an fp32 (or wider) sum: the error of the dtype, not of K terms rounded alike
    torch.testing.assert_close(y.cpu().double(), ref.double(), rtol=TOL[x.dtype], atol=TOL[x.dtype])


SHAPES = [(1, 8, 8), (3, 40, 24), (16, 33, 104), (8, 1, 4096), (16, 1000, 264), (5, 4099, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("M, N, K", SHAPES)
def test_cpu_matches_reference(dtype, M, N, K):
    x, w = inputs(M, N, K, dtype, "cpu")
    check_close(holokv.decode_linear(x, w), x, w)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("M, N, K", SHAPES + [(16, 9000, 4096), (1, 100, 14336), (2, 300, 12), (0, 5, 8),
                                              (4, 0, 8), (4, 7, 0)])
def test_cuda_matches_reference(dtype, M, N, K):
    x, w = inputs(M, N, K, dtype, "cuda")
    check_close(holokv.decode_linear(x, w), x, w)


@needs_cuda
def test_cuda_unaligned_views_take_the_plain_gemm():
    x, w = inputs(4, 64, 48, torch.bfloat16, "cuda")
    xs = torch.cat([x.new_zeros(1), x.flatten()])[1:].view(4, 48)  # off 16-byte alignment, contiguous
    check_close(holokv.decode_linear(xs, w), xs, w)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_nan_in_gives_nan_out_in_its_row_and_column(device):
    x, w = inputs(4, 70, 64, torch.bfloat16, device)
    x[1, 5], w[9, 3] = float("nan"), float("nan")
    y = holokv.decode_linear(x, w).cpu()
    nan = torch.zeros(4, 70, dtype=torch.bool)
    nan[1, :], nan[:, 9] = True, True
    assert torch.equal(y.isnan(), nan)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_bad_input_is_named(device):
    x, w = inputs(4, 16, 32, torch.float32, device)
    cases = [((x.half(), w), "weight has dtype .* but x has "),
             ((x[None], w), r"x must be \[M, K\]"),
             ((torch.cat([x] * 5), w), "x holds 20 rows; decode_linear serves at most 16"),
             ((x, w[:, :16].contiguous()), r"weight must be \[N, K\] with K = x.size\(1\) = 32"),
             ((x.t(), w), "x must be contiguous"),
             ((x, w.long()), "weight must be a floating-point tensor")]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            holokv.decode_linear(*args)


@needs_cuda
def test_cuda_mixed_devices_are_named():
    x, w = inputs(2, 8, 16, torch.float16, "cuda")
    with pytest.raises(RuntimeError, match="weight is on cpu but x is on cuda"):
        holokv.decode_linear(x, w.cpu())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_opcheck(device):
    for dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(ops.decode_linear.default, inputs(3, 40, 64, dtype, device))


def test_input_requiring_grad_raises():
    x, w = inputs(2, 8, 16, torch.float32, "cpu")
    w.requires_grad_()
    with pytest.raises(RuntimeError, match="decode_linear is not differentiable, but its weight requires grad"):
        holokv.decode_linear(x, w)
    with torch.no_grad():
        check_close(holokv.decode_linear(x, w), x, w.detach())
