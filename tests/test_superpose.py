import pytest
import torch

import holokv
from holokv.reference import superpose_ref

from conftest import dtype_id, needs_cuda

SHAPES = [(1, 1, 1, 64), (2, 3, 10, 64), (1, 2, 33, 128), (3, 1, 16, 64)]


@pytest.mark.parametrize("k", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_matches_reference(shape, k):
    x = torch.randn(*shape, dtype=torch.float64)
    keys = holokv.phase_keys(k, shape[-1], dtype=torch.float64)
    out = holokv.superpose(x, keys)
    assert out.shape == (*shape[:2], -(-shape[2] // k), shape[3])
    torch.testing.assert_close(out, superpose_ref(x, keys), rtol=1e-12, atol=1e-12)


def test_partial_slot_sums_only_present_tokens():
    k, d = 4, 64
    keys = holokv.phase_keys(k, d, dtype=torch.float64)
    x = torch.randn(1, 1, 6, d, dtype=torch.float64)
    out = holokv.superpose(x, keys)
    torch.testing.assert_close(out[0, 0, 1], (x[0, 0, 4] * keys[0] + x[0, 0, 5] * keys[1]) / 2)


def test_linear():
    keys = holokv.phase_keys(4, 64, dtype=torch.float64)
    x, y = torch.randn(2, 2, 2, 9, 64, dtype=torch.float64)
    a, b = 0.7, -1.3
    torch.testing.assert_close(holokv.superpose(a * x + b * y, keys),
                               a * holokv.superpose(x, keys) + b * holokv.superpose(y, keys))


def test_demodulation_recovers_token_plus_crosstalk():
    """<slot * Phi_j> = (x_j + sum_{t != j} x_t * Phi_t * Phi_j) / sqrt(k): the aligned token survives."""
    k, d = 4, 64
    keys = holokv.phase_keys(k, d, dtype=torch.float64)
    x = torch.randn(1, 1, k, d, dtype=torch.float64)
    slot = holokv.superpose(x, keys)[0, 0, 0]
    for j in range(k):
        cross = sum(x[0, 0, t] * keys[t] * keys[j] for t in range(k) if t != j)
        torch.testing.assert_close(slot * keys[j] * k ** 0.5, x[0, 0, j] + cross)


def test_gradcheck():
    keys = holokv.phase_keys(4, 64, dtype=torch.float64)
    x = torch.randn(1, 2, 7, 64, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: holokv.superpose(t, keys), (x,))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_opcheck(device):
    keys = holokv.phase_keys(4, 64, device=device)
    for n in (1, 9):
        x = torch.randn(2, 3, n, 64, device=device, requires_grad=True)
        torch.library.opcheck(torch.ops.holokv.superpose.default, (x, keys))


@pytest.mark.parametrize("make, match", [
    (lambda: (torch.randn(1, 2, 4, 64).int(), holokv.phase_keys(4, 64)), "floating-point"),
    (lambda: (torch.randn(2, 4, 64), holokv.phase_keys(4, 64)), r"\[B, H, N, head_dim\]"),
    (lambda: (torch.randn(1, 2, 64, 4).transpose(2, 3), holokv.phase_keys(4, 64)), "contiguous"),
    (lambda: (torch.randn(1, 2, 4, 63), torch.ones(4, 63)), "even"),
    (lambda: (torch.randn(1, 2, 4, 64), torch.ones(3, 64)), "power of two"),
    (lambda: (torch.randn(1, 2, 4, 64), holokv.phase_keys(4, 128)), "head_dim"),
])
@pytest.mark.parametrize("device", ["cpu", "meta"])  # meta: the fake kernel runs the same checks
def test_bad_input(make, match, device):
    with pytest.raises(RuntimeError, match=match):
        holokv.superpose(*[t.to(device) for t in make()])


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("k", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("shape", SHAPES + [(2, 8, 1000, 128)])
def test_cuda_matches_reference(shape, k, dtype):
    x = torch.randn(*shape, device="cuda").to(dtype)
    keys = holokv.phase_keys(k, shape[-1], device="cuda")
    out = holokv.superpose(x, keys)
    ref = superpose_ref(x.double(), keys.double())
    same_precision = superpose_ref(x, keys.to(dtype))  # how far PyTorch drifts at this dtype
    err = (out.double() - ref).abs().max().item()
    assert out.dtype == dtype
    assert err <= 2 * (same_precision.double() - ref).abs().max().item() + 1e-6


@needs_cuda
def test_cuda_device_mismatch():
    with pytest.raises(RuntimeError, match="phase is on"):
        holokv.superpose(torch.randn(1, 1, 4, 64, device="cuda"), holokv.phase_keys(4, 64))
