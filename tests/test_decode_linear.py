"""decode_linear (x [..., K] times an nn.Linear weight [N, K]) against float64: the Triton kernel for a decode step's
rows (CUDA, 16-bit, M <= 16) over every row count, weights whose rows do not fill a program, K not a multiple of a
tile; F.linear for the rest (CPU, fp32, more rows), identical to it; NaN propagates; bad input is named; opcheck."""
import pytest
import torch
import torch.nn.functional as F

from holokv.decode_linear import decode_linear, takes

from conftest import dtype_id, needs_cuda

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def inputs(shape, N, K, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, K, generator=g, dtype=torch.float64)
    w = torch.randn(N, K, generator=g, dtype=torch.float64) / max(K, 1) ** 0.5
    return x.to(dtype).to(device), w.to(dtype).to(device)


def check_close(y, x, w):
    ref = x.cpu().double() @ w.cpu().double().T
    assert y.shape == ref.shape and y.dtype == x.dtype and y.device == x.device
    # one rounding of an fp32 (or wider) sum: the error of the dtype, not of K terms rounded alike
    torch.testing.assert_close(y.cpu().double(), ref, rtol=TOL[x.dtype], atol=TOL[x.dtype])


SHAPES = [((1,), 8, 8), ((3,), 40, 24), ((16,), 33, 104), ((8,), 1, 4096), ((2, 1, 8), 1000, 264),
          ((5,), 4099, 64), ((16, 1), 6144, 4096)]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape, N, K", SHAPES)
def test_cpu_is_f_linear(dtype, shape, N, K):
    x, w = inputs(shape, N, K, dtype, "cpu")
    assert torch.equal(decode_linear(x, w), F.linear(x, w))


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape, N, K", SHAPES + [((1,), 100, 14336), ((2,), 300, 12), ((0,), 5, 8), ((4,), 0, 8),
                                                  ((4,), 7, 0), ((17,), 64, 64)])
def test_cuda_matches_float64(dtype, shape, N, K):
    x, w = inputs(shape, N, K, dtype, "cuda")
    assert takes(x, w) == (dtype in (torch.float16, torch.bfloat16) and K > 0 and x.numel() // K <= 16)
    check_close(decode_linear(x, w), x, w)


@needs_cuda
def test_cuda_unaligned_and_strided_inputs():
    x, w = inputs((4,), 64, 48, torch.bfloat16, "cuda")
    shifted = torch.cat([x.new_zeros(1), x.flatten()])[1:].view(4, 48)  # off 16-byte alignment, contiguous
    check_close(decode_linear(shifted, w), shifted, w)
    assert not takes(x.t().contiguous().t(), w)  # strided: F.linear
    check_close(decode_linear(x.t().contiguous().t(), w), x, w)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_nan_in_gives_nan_out_in_its_row_and_column(device):
    x, w = inputs((4,), 70, 300, torch.bfloat16, device)
    x[1, 5], w[9, 260] = float("nan"), float("nan")
    y = decode_linear(x, w).cpu()
    nan = torch.zeros(4, 70, dtype=torch.bool)
    nan[1, :], nan[:, 9] = True, True
    assert torch.equal(y.isnan(), nan)


def test_bad_input_is_named():
    x, w = inputs((4,), 16, 32, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"x \[..., K\] and weight \[N, K\] must share K, got \(4, 32\) and \(16, 16\)"):
        decode_linear(x, w[:, :16])
    with pytest.raises(ValueError, match="must share K"):
        decode_linear(x, w[0])


@needs_cuda
def test_cuda_mixed_devices_raise():
    x, w = inputs((2,), 8, 16, torch.float16, "cuda")
    with pytest.raises(RuntimeError, match="device"):
        decode_linear(x, w.cpu())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_opcheck(device):
    for dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(torch.ops.holokv.decode_linear.default, inputs((3,), 40, 64, dtype, device))
