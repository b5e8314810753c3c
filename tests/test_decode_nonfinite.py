"""holo_decode's NaN and masking conventions (README): the CPU kernel, the CUDA kernels and the
reference agree, and each case also states which query rows must be NaN, so agreement on zeros
cannot pass for agreement on NaN."""
import pytest
import torch

import holokv
from holokv.reference import holo_decode_ref

from cases import decode_case
from conftest import dtype_id, needs_cuda

NAN, INF = float("nan"), float("inf")
G = 2  # query heads per KV head: rows [0, G) read KV head 0, [G, 2G) KV head 1
# CUDA float32 runs the CUDA-core kernel; bfloat16 in aligned mode the tensor-core one
KERNELS = [("cpu", torch.float64), ("cpu", torch.float32), pytest.param("cuda", torch.float32, marks=needs_cuda),
           pytest.param("cuda", torch.bfloat16, marks=needs_cuda)]
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2}


def rows(*spec):
    """[B=2, Hq=2G] bool: True at (sequence, query head range) pairs."""
    mask = torch.zeros(2, 2 * G, dtype=torch.bool)
    for b, heads in spec:
        mask[b, heads] = True
    return mask


def poison(case, name):
    """Edits ``case`` (sequence 0: 9 superposed tokens and 3 tail tokens; sequence 1: none and 2) in place;
    returns holo_decode's extra keywords and the rows that must be NaN."""
    bias = torch.zeros(case.k_tail.shape[:3], dtype=case.q.dtype, device=case.q.device)
    kv0, kv1, everything = slice(0, G), slice(G, 2 * G), slice(None)
    if name == "q":
        case.q[0, 1] = NAN
        return {}, rows((0, slice(1, 2)))
    if name == "used tail key":
        case.k_tail[0, 1, 2] = NAN
        return {}, rows((0, kv1))
    if name == "used slot value":
        case.v_slots[0, 0, 1] = NAN
        return {}, rows((0, kv0))
    if name == "scale":
        return {"scale": NAN}, rows((0, everything), (1, everything))
    if name == "slot_gain":  # sequence 1 reads no slot
        return {"slot_gain": NAN}, rows((0, everything))
    if name == "tail_bias nan":
        bias[1, 0, 1] = NAN
        return {"tail_bias": bias}, rows((1, kv0))
    if name == "tail_bias +inf":
        bias[0, 1, 0] = INF
        return {"tail_bias": bias}, rows((0, kv1))
    if name == "unused capacity":  # slots past slot_lens and tail rows past tail_lens are never read
        case.k_slots[0, :, 3:] = NAN
        case.v_slots[1] = NAN
        case.k_tail[0, :, 3:] = NAN
        case.v_tail[1, :, 2:] = NAN
        bias[1, :, 2:] = NAN
        return {"tail_bias": bias}, rows()
    if name == "masked entry":  # weight 0: its NaN value still multiplies in, as in p @ v
        bias[0, 0, 1] = -INF
        case.v_tail[0, 0, 1] = NAN
        return {"tail_bias": bias}, rows((0, kv0))
    if name == "all masked":  # sequence 1 (no slots) has every tail entry at -inf: zeros, values unread
        bias[1] = -INF
        case.v_tail[1, 0, 0] = NAN
        return {"tail_bias": bias}, rows()
    raise ValueError(name)


POISONS = ["q", "used tail key", "used slot value", "scale", "slot_gain", "tail_bias nan", "tail_bias +inf",
           "unused capacity", "masked entry", "all masked"]


def reference(case, mode, kw):
    kw64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    return holo_decode_ref(*case.to(torch.float64).args(), mode=mode, **kw64)


def assert_matches(out, ref, nan_rows):
    for t in (out, ref):  # NaN rows are NaN in every dimension, the others in none
        assert torch.equal(t.isnan().all(-1).cpu(), nan_rows) and torch.equal(t.isnan().any(-1).cpu(), nan_rows)
    tol = TOL[out.dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.parametrize("device, dtype", KERNELS, ids=lambda x: dtype_id(x) if isinstance(x, torch.dtype) else x)
@pytest.mark.parametrize("mode", ["full", "aligned"])
@pytest.mark.parametrize("name", POISONS)
def test_nonfinite_input(name, mode, device, dtype):
    case = decode_case([9, 0], [3, 2], hkv=2, group=G, k=4, head_dim=64, dtype=dtype, device=device, seed=3)
    kw, nan_rows = poison(case, name)
    out = holokv.holo_decode(*case.args(), mode=mode, **kw)
    assert_matches(out, reference(case, mode, kw), nan_rows)
    if name == "all masked":
        assert (out[1] == 0).all()


@pytest.mark.parametrize("device, dtype", KERNELS, ids=lambda x: dtype_id(x) if isinstance(x, torch.dtype) else x)
def test_masked_runs_across_splits(device, dtype):
    """Long runs of -inf biases: on CUDA whole splits of a row, and the first tiles of others, see nothing
    unmasked, which must weigh 0 (not NaN) when the splits merge."""
    case = decode_case([40, 0], [3000, 2500], hkv=2, group=G, k=4, head_dim=64, dtype=dtype, device=device)
    t = torch.arange(case.k_tail.shape[2], device=device)
    bias = torch.where((t < 640) | ((t // 32) % 2 == 0), -INF, 0.0).expand(case.k_tail.shape[:3]).to(dtype)
    for mode in ("full", "aligned"):
        kw = {"tail_bias": bias.contiguous()}
        assert_matches(holokv.holo_decode(*case.args(), mode=mode, **kw), reference(case, mode, kw), rows())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_no_entries_is_zeros(device):
    case = decode_case([0, 5], [0, 1], hkv=2, group=G, k=4, head_dim=64, device=device)
    out = holokv.holo_decode(*case.args())
    assert (out[0] == 0).all() and torch.isfinite(out[1]).all() and (out[1] != 0).any()
    assert (reference(case, "full", {})[0] == 0).all()
