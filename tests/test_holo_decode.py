import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import holokv
from holokv.reference import holo_decode_ref

from cases import decode_case, reference_drift
from conftest import dtype_id, needs_cuda

MODES = ["full", "aligned"]
# (superposed tokens, tail tokens) per sequence: ragged batches, partial last
# slots, N = 1 (only the query's own token), nothing superposed yet
LENGTHS = [([21, 0, 8], [3, 1, 2]), ([0], [1]), ([1], [1]), ([37, 64], [2, 4])]


def ref64(case, mode, **kw):
    return holo_decode_ref(*case.to(torch.float64).args(), mode=mode, **kw)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("lens", LENGTHS)
def test_cpu_matches_reference(lens, group, k, mode):
    case = decode_case(*lens, group=group, k=k, dtype=torch.float64, seed=k * 10 + group)
    out = holokv.holo_decode(*case.args(), mode=mode, scale=0.2, slot_gain=1.5)
    torch.testing.assert_close(out, ref64(case, mode, scale=0.2, slot_gain=1.5), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_tail_bias(device):
    """A log-mass bias on an exact token: against the reference, and log 3 weighs as three copies."""
    case = decode_case([13, 0], [3, 2], k=4, group=3, head_dim=64, device=device)
    bias = torch.randn(case.k_tail.shape[:3], device=device)
    for mode in MODES:
        out = holokv.holo_decode(*case.args(), mode=mode, tail_bias=bias)
        ref = holo_decode_ref(*case.to(torch.float64).args(), mode=mode, tail_bias=bias.double())
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    # no slots: the decode over an SRC-compacted cache; token 0 with bias log 3 == token 0 three times
    q, k, v = case.q[:1], case.k_tail[:1, :, :2].contiguous(), case.v_tail[:1, :, :2].contiguous()
    none = torch.zeros(1, k.shape[1], 0, 64, device=device)
    lens = lambda n: torch.tensor([n], device=device)  # noqa: E731
    bias = torch.tensor([math.log(3.0), 0.0], device=device).expand(1, k.shape[1], 2).contiguous()
    biased = holokv.holo_decode(q, none, none, case.keys, lens(0), k, v, lens(2), tail_bias=bias)
    k3, v3 = k[:, :, [0, 0, 0, 1]].contiguous(), v[:, :, [0, 0, 0, 1]].contiguous()
    copies = holokv.holo_decode(q, none, none, case.keys, lens(0), k3, v3, lens(4))
    torch.testing.assert_close(biased, copies, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="tail_bias must be"):
        holokv.holo_decode(*case.args(), tail_bias=bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_cpu_low_precision(dtype):
    case = decode_case([21, 5], [3, 2], group=4, k=4, dtype=dtype)
    out = holokv.holo_decode(*case.args())
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref64(case, "full"), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("group", [1, 4])
def test_k1_is_standard_attention(device, group):
    """With k = 1 a slot is a token: slots + tail must equal SDPA over their concatenation."""
    B, hkv, d, n_sup, n_tail = 2, 2, 64, 19, 3
    case = decode_case([n_sup] * B, [n_tail] * B, hkv=hkv, group=group, k=1, head_dim=d, device=device,
                       extra_slots=0, extra_tail=0)
    for mode in MODES:
        out = holokv.holo_decode(*case.args(), mode=mode)
        keys = torch.cat([case.k_slots, case.k_tail], 2)
        vals = torch.cat([case.v_slots, case.v_tail], 2)
        sdpa = F.scaled_dot_product_attention(case.q[:, :, None], keys, vals, enable_gqa=True)[:, :, 0]
        torch.testing.assert_close(out, sdpa, rtol=1e-4, atol=1e-5)


def test_slot_gain_sqrt_k_makes_target_logit_unbiased():
    """Averaged over random neighbours, the full-mode logit of token j equals its exact logit."""
    k, d = 4, 64
    keys = holokv.phase_keys(k, d, dtype=torch.float64)
    q, x = torch.randn(d, dtype=torch.float64), torch.randn(2000, k, d, dtype=torch.float64)
    slots = holokv.superpose(x.permute(1, 0, 2)[None].transpose(1, 2).reshape(1, 1, -1, d), keys)[0, 0]
    read = math.sqrt(k) * ((q * keys[1]) * slots).sum(-1)  # slot_gain = sqrt(k), phase 1
    exact = (q * x[:, 1]).sum(-1)
    assert (read - exact).mean().abs() < 4 * (read - exact).std() / math.sqrt(2000)
    assert (read - exact).std() > 0.5 * exact.std()  # cross-talk is as large as the signal


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_opcheck(device):
    for lens, k in [(([9, 4], [2, 1]), 4), (([0], [1]), 2)]:
        case = decode_case(*lens, k=k, group=3, device=device)
        bias = torch.randn(case.k_tail.shape[:3], device=device)
        for mode in MODES:
            torch.library.opcheck(torch.ops.holokv.holo_decode.default, case.args() + (mode, None, 1.0))
            torch.library.opcheck(torch.ops.holokv.holo_decode.default, case.args() + (mode, 0.3, 2.0, bias))


def _edit(**changes):
    """A good case with some of its tensors changed."""
    case = decode_case([8, 3], [2, 1], k=4, group=3)
    for name, fn in changes.items():
        setattr(case, name, fn(getattr(case, name)))
    return case


def _bad_inputs():
    """Rejected from the arguments' dtypes, devices, ranks and shapes: by the kernels and by the fake kernel."""
    return [
        (_edit(q=lambda t: t.int()), {}, "q must be a floating-point"),
        (_edit(q=lambda t: t[:, :5].contiguous()), {}, "not a multiple"),
        (_edit(q=lambda t: t[:, :, :63].contiguous()), {}, "even"),
        (_edit(q=lambda t: t.transpose(0, 1).contiguous().transpose(0, 1)), {}, "q must be contiguous"),
        (_edit(k_slots=lambda t: t.double()), {}, "k_slots has dtype"),
        (_edit(v_tail=lambda t: t[:, :1].contiguous()), {}, "v_tail has 1 KV heads"),
        (_edit(v_slots=lambda t: t[..., :32].contiguous()), {}, "v_slots.size\\(3\\)"),
        (_edit(k_tail=lambda t: t[0]), {}, "k_tail must be"),
        (_edit(keys=lambda t: t[:3].contiguous()), {}, "power of two"),
        (_edit(slot_lens=lambda t: t.int()), {}, "slot_lens must be int64"),
        (_edit(tail_lens=lambda t: t[:1]), {}, "tail_lens must be \\[B\\]"),
        (_edit(), {"mode": "both"}, "mode must be"),
    ]


def _bad_lengths():
    """Lengths past the capacity: values, which only the kernels see."""
    return [
        (_edit(slot_lens=lambda t: t + 100), {}, "slot_lens\\[0\\]"),
        (_edit(tail_lens=lambda t: t - 5), {}, "tail_lens\\[0\\]"),
    ]


@pytest.mark.parametrize("case, kw, match", _bad_inputs() + _bad_lengths())
def test_bad_input(case, kw, match):
    with pytest.raises(RuntimeError, match=match):
        holokv.holo_decode(*case.args(), **kw)


@pytest.mark.parametrize("case, kw, match", _bad_inputs())
def test_fake_rejects_bad_input(case, kw, match):
    """The fake kernel (meta tensors, FakeTensor, torch.compile) runs the kernels' argument checks."""
    with pytest.raises(RuntimeError, match=match):
        holokv.holo_decode(*[t.to("meta") for t in case.args()], **kw)


# ---- CUDA against the fp64 reference, on the shape grid -------------------------------------------

def assert_close_to_reference(out, case, mode, **kw):
    """Tolerance from how far the same computation in plain PyTorch at the input dtype drifts."""
    ref = ref64(case, mode, **kw)
    bound = 2 * reference_drift(holo_decode_ref(*case.args(), mode=mode, **kw), ref) + 1e-5
    assert out.dtype == case.q.dtype
    assert torch.isfinite(out).all()
    assert (out.double() - ref).abs().max().item() <= bound


@needs_cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("k", [1, 2, 4, 8, 16])
def test_cuda_matches_reference(k, group, head_dim, dtype, mode):
    for i, lens in enumerate(LENGTHS):
        case = decode_case(*lens, group=group, k=k, head_dim=head_dim, dtype=dtype, device="cuda", seed=i)
        out = holokv.holo_decode(*case.args(), mode=mode, scale=0.1, slot_gain=1.3)
        assert_close_to_reference(out, case, mode, scale=0.1, slot_gain=1.3)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 8])
def test_cuda_tail_bias_matches_reference(group, head_dim, dtype):
    """Log-mass biases on the tail in the cache dtype, as SRC's compacted cache stores them (16-bit aligned
    mode runs on tensor cores); the last case is a long compacted cache alone: no slots, ragged."""
    for i, lens in enumerate(LENGTHS + [([0, 0], [700, 45])]):
        case = decode_case(*lens, group=group, k=4, head_dim=head_dim, dtype=dtype, device="cuda", seed=i)
        bias = (2 * torch.randn(case.k_tail.shape[:3], device="cuda")).to(dtype)
        for mode in MODES:
            out = holokv.holo_decode(*case.args(), mode=mode, tail_bias=bias)
            assert_close_to_reference(out, case, mode, tail_bias=bias)


@needs_cuda
@pytest.mark.parametrize("k, group, head_dim, lens", [
    (4, 4, 128, ([4096 * 4 - 3, 1000], [7, 64])), (2, 3, 64, ([9000, 3], [1, 33])), (16, 8, 128, ([20000], [5])),
])
def test_cuda_long_ragged(k, group, head_dim, lens):
    """Long caches split across many warps, with very different lengths in one batch."""
    case = decode_case(*lens, group=group, k=k, head_dim=head_dim, hkv=2, dtype=torch.bfloat16, device="cuda")
    for mode in MODES:
        assert_close_to_reference(holokv.holo_decode(*case.args(), mode=mode), case, mode)


@needs_cuda
def test_cuda_errors():
    case = decode_case([8, 3], [2, 1], k=4, device="cuda")
    with pytest.raises(RuntimeError, match="phase is on"):
        holokv.holo_decode(*case.args()[:3], case.keys.cpu(), *case.args()[4:])
    with pytest.raises(RuntimeError, match="slot_lens is on"):
        holokv.holo_decode(*case.args()[:4], case.slot_lens.cpu(), *case.args()[5:])
    with pytest.raises(RuntimeError, match="head_dim 64 and 128"):
        c = decode_case([8], [2], k=4, head_dim=96, device="cuda")
        holokv.holo_decode(*c.args())
    with pytest.raises(RuntimeError, match="16-byte boundary"):
        kt = torch.randn(case.k_tail.numel() + 2, device="cuda")[2:].view(case.k_tail.shape)
        holokv.holo_decode(*case.args()[:5], kt, *case.args()[6:])
    # lengths past capacity cannot be checked without a sync: that sequence is NaN, the other is right
    lens = case.slot_lens.clone()
    lens[0] = 10_000
    out = holokv.holo_decode(*case.args()[:4], lens, *case.args()[5:])
    assert out[0].isnan().all() and torch.isfinite(out[1]).all()


@needs_cuda
def test_cuda_matches_cpu_kernel():
    case = decode_case([37, 5, 0], [2, 9, 1], k=8, group=4, dtype=torch.float32)
    cuda = decode_case([37, 5, 0], [2, 9, 1], k=8, group=4, dtype=torch.float32, device="cuda")
    for mode in MODES:
        torch.testing.assert_close(holokv.holo_decode(*cuda.args(), mode=mode).cpu(),
                                   holokv.holo_decode(*case.args(), mode=mode), rtol=1e-4, atol=1e-5)
