"""holo_prefill_attention, the training attention through a HoloKV cache: every row against holo_decode reading
the cache that holo_append builds from the same tokens (the definition), the FlexAttention path against the
dense reference (values on CPU; values and gradients, fp32 and bf16, compiled on CUDA), fp64 gradcheck of the
reference, and argument errors."""
import dataclasses

import pytest
import torch

import holokv
from holokv.caches.superposed import HoloSpec, superposed_attention
from holokv.caches.prefill_attention import flex_prefill_attention, holo_prefill_attention
from conftest import dtype_id, needs_cuda

# (N, left pads per sequence, Hkv, query heads per KV head, head_dim, k, ratio, sinks)
CASES = [
    (1, [0], 2, 1, 64, 2, 2, 0),  # a single token
    (37, [0, 5], 2, 3, 64, 4, 3, 4),  # N not a multiple of k, ragged left pads, GQA 3
    (29, [2, 0], 1, 4, 128, 8, 6, 4),  # k = 8, head_dim 128, GQA 4
    (150, [3], 1, 1, 64, 2, 2, 0),  # ratio = k: no recent share, every full slot closes; two mask blocks
    (40, [0, 36], 2, 4, 128, 4, 2, 4),  # a sequence that is mostly pads: its 4 tokens are all sinks
]
MODES = ["aligned", "full"]
ids = [f"N{c[0]}-pads{c[1]}-gqa{c[3]}-d{c[4]}-k{c[5]}-sinks{c[7]}" for c in CASES]


def problem(n, pads, hkv, group, d, k, ratio, sinks, mode, device="cpu", dtype=torch.float32, seed=0):
    spec = HoloSpec(k=k, ratio=ratio, sinks=sinks, mode=mode, slot_gain=1.5)
    g = torch.Generator().manual_seed(seed)
    q, key, value = (torch.randn(len(pads), h, n, d, generator=g).to(device, dtype) for h in (hkv * group, hkv, hkv))
    phase = holokv.phase_keys(k, d, device=device, dtype=dtype)
    return spec, phase, q, key, value, torch.tensor(pads, device=device)


def reference(q, k, v, phase, spec, pads, scale):
    return superposed_attention(spec, phase, q, k, v, pads, scale)


def decoded(spec, phase, q, k, v, pads, scale):
    """[B, N, Hq, d]: row i of a sequence is holo_decode after holo_append fed it its tokens up to i; a pad
    row is its own value (a pad query reads only itself)."""
    B, Hq, n, d = q.shape
    Hkv = k.shape[1]
    out = v.repeat_interleave(Hq // Hkv, 1).transpose(1, 2).clone()
    for b, p in enumerate(pads.tolist()):
        slots = [k.new_zeros(1, Hkv, n // spec.k + 1, d) for _ in "kv"]
        tail = [k.new_zeros(1, Hkv, n + 1, d) for _ in "kv"]
        slot_lens, tail_lens, start, evicted = (torch.zeros(1, dtype=torch.long, device=q.device) for _ in range(4))
        for i in range(p, n):
            holokv.holo_append(k[b:b + 1, :, i].contiguous(), v[b:b + 1, :, i].contiguous(), phase, *slots, *tail,
                               slot_lens, tail_lens, start, spec.sinks, spec.exact_share, spec.window_slots, evicted)
            out[b, i] = holokv.holo_decode(q[b:b + 1, :, i].contiguous(), *slots, phase, slot_lens, *tail, tail_lens,
                                           spec.mode, scale, spec.slot_gain, None, start)[0]
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_rows_equal_holo_decode(case, mode, device):
    """Where holo_decode and the training attention disagree on a position, the training attention is wrong."""
    spec, phase, q, k, v, pads = problem(*case, mode, device)
    scale = 0.7 * q.shape[-1] ** -0.5
    out = holo_prefill_attention(q, k, v, phase, spec, pads, scale)
    torch.testing.assert_close(out, decoded(spec, phase, q, k, v, pads, scale), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("window", [1, 3])
def test_window_rows_equal_holo_decode(window, mode, device):
    """With a window of slots (block-level eviction), each row reads the slots still held, as holo_decode does."""
    spec, phase, q, k, v, pads = problem(90, [0, 13], 2, 2, 64, 4, 3, 2, mode, device)
    spec = dataclasses.replace(spec, window_slots=window)
    scale = q.shape[-1] ** -0.5
    out = holo_prefill_attention(q, k, v, phase, spec, pads, scale)
    torch.testing.assert_close(out, decoded(spec, phase, q, k, v, pads, scale), atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on purpose
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_flex_matches_reference_cpu(case, mode):
    """FlexAttention's eager CPU path (forward only) reads the same entries under the same mask."""
    spec, phase, q, k, v, pads = problem(*case, mode)
    scale = q.shape[-1] ** -0.5
    with torch.no_grad():
        fast = flex_prefill_attention(q, k, v, phase, spec, pads, scale, compiled=False)
    torch.testing.assert_close(fast, reference(q, k, v, phase, spec, pads, scale), atol=1e-5, rtol=1e-5)


def values_and_grads(attend, spec, phase, q, k, v, pads):
    """attend's output and the gradients wrt q, k, v of a fixed random projection of it."""
    inputs = [x.detach().requires_grad_() for x in (q, k, v)]
    out = attend(*inputs, phase, spec, pads, q.shape[-1] ** -0.5)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out))
    return [out] + [x.grad for x in inputs]


def assert_near(fast, ref, tol):
    """Errors relative to each reference's norm; the input gradients' on at least dv's scale, since dq (and
    dk) is exactly 0 where every query reads a single entry (a softmax of one score has no slope: N = 1),
    and rounding leaves the fast path a tiny nonzero value there."""
    dv = ref[3].float().norm()
    for name, a, b in zip(["out", "dq", "dk", "dv"], fast, ref):
        scale = b.float().norm() if name == "out" else max(b.float().norm(), dv)
        err = (a.float() - b.float()).norm() / scale
        assert err < tol, f"{name}: relative error {err:.2e}"


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_flex_matches_reference_cuda(case, mode, dtype):
    """The compiled FlexAttention path (holo_prefill_attention on CUDA): values and gradients wrt q, k, v."""
    args = problem(*case, mode, "cuda", dtype)
    assert_near(values_and_grads(holo_prefill_attention, *args), values_and_grads(reference, *args),
                1e-4 if dtype == torch.float32 else 3e-2)  # relative to the reference's norm


@needs_cuda
def test_inside_torch_compile_cuda():
    """A caller that compiles its own forward (a student model) gets the same values and gradients."""
    args = problem(*CASES[1], "aligned", "cuda")
    assert_near(values_and_grads(torch.compile(holo_prefill_attention), *args), values_and_grads(reference, *args),
                1e-4)


@needs_cuda
def test_prefill_bench_cuda(tmp_path):
    """holokv bench prefill: a row per attention, k and mode, SDPA's first, each with its ratio to SDPA's."""
    import json

    from holokv.cli import main

    assert main(["bench", "prefill", "--batch", "2", "--tokens", "128", "--k", "2", "--modes", "aligned", "--reps",
                 "2", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "prefill_bench.json").read_text())["rows"]
    assert [(r["attention"], r.get("k"), r.get("mode")) for r in rows] == [("sdpa", None, None),
                                                                           ("holokv", 2, "aligned")]
    assert rows[0]["fwd_bwd_vs_sdpa"] == 1 and all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > r["fwd_ms"] for r in rows)


@pytest.mark.parametrize("mode", MODES)
def test_reference_gradcheck(mode):
    spec, phase, q, k, v, pads = problem(9, [0, 3], 1, 2, 16, 4, 2, 2, mode, dtype=torch.float64)
    inputs = [x.requires_grad_() for x in (q, k, v)]
    assert torch.autograd.gradcheck(lambda *x: reference(*x, phase, spec, pads, 0.3), inputs, fast_mode=True)


@pytest.mark.parametrize("change, match", [
    (dict(spec=(4, 2)), "spec must be a HoloSpec"),
    (dict(k=torch.randn(2, 3, 8, 16), v=torch.randn(2, 3, 8, 16)), "Hkv dividing Hq = 4"),
    (dict(v=torch.randn(2, 2, 7, 16)), "k, v"),
    (dict(q=torch.randn(2, 4, 8, 16, dtype=torch.float64)), "dtype"),
    (dict(phase=holokv.phase_keys(2, 16)), "phase must be \\[spec.k, head_dim\\] = \\[4, 16\\]"),
    (dict(pads=torch.zeros(2, dtype=torch.int32)), "pads must be int64"),
    (dict(pads=torch.zeros(3, dtype=torch.long)), "pads must be int64 \\[B\\] = \\[2\\]"),
])
def test_bad_arguments(change, match):
    spec, phase, q, k, v, pads = problem(8, [0, 1], 2, 2, 16, 4, 2, 0, "full")
    args = dict(q=q, k=k, v=v, phase=phase, spec=spec, pads=pads) | change
    with pytest.raises((ValueError, TypeError), match=match):
        holo_prefill_attention(**args)
