"""holo_append (HoloKV's in-place append with the slot written once) against its reference, over many steps:
ragged counters, rings that wrap, sinks longer than a slot, every k and both exact shares."""
import pytest
import torch

import holokv
from holokv.reference import holo_append_ref, holo_decode_ref

from conftest import dtype_id, needs_cuda


def state(B=3, H=2, d=16, S=12, T=11, dtype=torch.float64, device="cpu", seed=0, k=None):
    """An empty cache whose unused capacity is NaN: nothing may read it."""
    g = torch.Generator().manual_seed(seed)
    nan = lambda *s: torch.full(s, float("nan"), dtype=dtype, device=device)  # noqa: E731
    counters = [torch.zeros(B, dtype=torch.long, device=device) for _ in range(3)]
    counters[2] += torch.randint(0, T, (B,), generator=g).to(device)  # rings start anywhere
    return [nan(B, H, S, d), nan(B, H, S, d), nan(B, H, T, d), nan(B, H, T, d), *counters]


def run(steps, sinks, share, k, device="cpu", dtype=torch.float64, d=16, seed=0, check=None):
    """``steps`` appends to a cache sized for them, by the op and by the reference; returns both states."""
    size = dict(k=k, d=d, S=steps // k + 2, T=sinks + int(steps * share) + k + 2, seed=seed)
    phase = holokv.phase_keys(k, d, dtype=dtype, device=device)
    ours, ref = state(dtype=dtype, device=device, **size), state(dtype=dtype, **size)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        x = torch.randn(2, 3, 2, d, generator=g).to(dtype)
        holokv.holo_append(*x.to(device), phase, *ours, sinks, share)
        holo_append_ref(*x, phase.cpu(), *ref, sinks, share)
        if check:
            check(ours, ref, phase)
    return ours, ref


def assert_same(ours, ref, k):
    """Same counters, bit-equal ring entries in use, slots equal up to the rounding of the sum's last step
    (the rest is NaN in both)."""
    assert [t.cpu().tolist() for t in ours[4:]] == [t.tolist() for t in ref[4:]]
    slot_lens, tail_lens, start = ref[4:]
    T = ref[2].shape[2]
    for b in range(slot_lens.shape[0]):
        rows = [(int(start[b]) + i) % T for i in range(int(tail_lens[b]))]
        used = [slice(None, int(slot_lens[b]) // k)] * 2 + [rows] * 2
        for a, r, idx in zip(ours[:4], ref[:4], used):
            a, r = a[b][:, idx].cpu(), r[b][:, idx]
            assert not r.isnan().any()
            if isinstance(idx, list):  # ring entries are copies
                assert torch.equal(a, r)
            else:
                torch.testing.assert_close(a, r, rtol=1e-12 if r.dtype == torch.float64 else None,
                                           atol=1e-12 if r.dtype == torch.float64 else None)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("sinks", [0, 3, 6])
@pytest.mark.parametrize("share", [0.0, 0.2])
def test_cpu_matches_reference(k, sinks, share):
    ours, ref = run(40, sinks, share, k)
    assert_same(ours, ref, k)
    assert int(ref[4].max()) > 0  # slots closed


def test_decode_reads_the_new_token_and_the_ring():
    """After each append, holo_decode over the ring equals the reference decode over the same state."""
    d = 16

    def check(ours, ref, phase):
        q = torch.randn(3, 6, d, dtype=torch.float64)
        slot_lens, tail_lens, start = ours[4:]
        # NaN capacity: only slots in use are read; fill unused slots with zeros for the reference's einsum
        clean = [torch.nan_to_num(t) for t in ours[:4]]
        for mode in ("aligned", "full"):
            out = holokv.holo_decode(q, *clean[:2], phase, slot_lens, *clean[2:], tail_lens, mode, tail_start=start)
            want = holo_decode_ref(q, *clean[:2], phase, slot_lens, *clean[2:], tail_lens, mode, tail_start=start)
            torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    run(30, 3, 0.2, 4, d=d, check=check)


def test_capacity_overflow_raises_on_cpu():
    phase = holokv.phase_keys(4, 16, dtype=torch.float64)
    cache = state(S=1, T=5)
    x = torch.randn(2, 3, 2, 16, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="grow the cache first"):
        for _ in range(20):
            holokv.holo_append(*x, phase, *cache, 0, 0.0)


def test_bad_input():
    phase = holokv.phase_keys(4, 16, dtype=torch.float64)
    cache = state()
    x = torch.randn(3, 2, 16, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="k must be \\[B, Hkv, head_dim\\]"):
        holokv.holo_append(x[None], x, phase, *cache, 0, 0.0)
    with pytest.raises(RuntimeError, match="v has dtype"):
        holokv.holo_append(x, x.float(), phase, *cache, 0, 0.0)
    with pytest.raises(RuntimeError, match="exact_share"):
        holokv.holo_append(x, x, phase, *cache, 0, 1.5)
    with pytest.raises(RuntimeError, match="tail_lens must be int64"):
        holokv.holo_append(x, x, phase, *cache[:5], cache[5].int(), cache[6], 0, 0.0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_opcheck(device):
    phase = holokv.phase_keys(4, 16, device=device)
    cache = state(dtype=torch.float32, device=device)
    for t in cache[:4]:
        t.zero_()
    x = torch.randn(2, 3, 2, 16, device=device)
    torch.library.opcheck(torch.ops.holokv.holo_append.default, (*x, phase, *cache, 2, 0.25))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("k, sinks, share", [(4, 0, 0.0), (8, 4, 1 / 7), (2, 5, 0.3), (16, 4, 0.0)])
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_matches_reference(dtype, k, sinks, share, d):
    """The CUDA kernel sums a slot in fp32 in the same order as the reference: equal in every dtype."""
    ours, ref = run(60, sinks, share, k, device="cuda", dtype=dtype, d=d)
    assert_same(ours, ref, k)


@needs_cuda
def test_cuda_overflow_marks_the_sequence():
    phase = holokv.phase_keys(4, 64, device="cuda")
    cache = state(S=1, T=5, d=64, dtype=torch.float32, device="cuda")
    x = torch.randn(2, 3, 2, 64, device="cuda")
    for _ in range(12):
        holokv.holo_append(*x, phase, *cache, 0, 0.0)
    assert (cache[5] == 6).all()  # T + 1: holo_decode gives NaN for these sequences
