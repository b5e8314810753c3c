"""holo_append (HoloKV's in-place append with the slot written once) against its reference, over many steps:
ragged counters, rings that wrap, sinks longer than a slot, every k and both exact shares; its window of slots
(block-level eviction) against the reference, against slots built by hand from the tokens, and in the cache."""
import math

import pytest
import torch

import holokv
from holokv.caches.holo import HoloKVLayer
from holokv.caches.superposed import HoloSpec
from holokv.reference import closed_tokens_ref, holo_append_ref, holo_decode_ref, superpose_ref

from cases import append_args
from conftest import dtype_id, needs_cuda


def state(B=3, H=2, d=16, S=12, T=11, dtype=torch.float64, device="cpu", seed=0, k=None, window=0):
    """An empty cache whose unused capacity is NaN: nothing may read it; with a window, an evicted counter last."""
    g = torch.Generator().manual_seed(seed)
    nan = lambda *s: torch.full(s, float("nan"), dtype=dtype, device=device)  # noqa: E731
    counters = [torch.zeros(B, dtype=torch.long, device=device) for _ in range(4 if window else 3)]
    counters[2] += torch.randint(0, T, (B,), generator=g).to(device)  # rings start anywhere
    return [nan(B, H, S, d), nan(B, H, S, d), nan(B, H, T, d), nan(B, H, T, d), *counters]


def append(fn, x, phase, cache, sinks, share, window):
    """fn (the op or its reference) with the window's arguments only where there is one (else the old call)."""
    fn(*x, phase, *cache[:7], sinks, share, *((window, cache[7]) if window else ()))


def tokens(x: torch.Tensor, pick: slice, strided: bool) -> list:
    """k, v [B, H, d] of x [B, H, 3, d]: with ``strided``, views at the batch and head strides of a fused
    projection's output (k and v of one buffer, rows apart), else contiguous."""
    kv = [x[pick, :, 0], x[pick, :, 2]]
    return kv if strided else [t.contiguous() for t in kv]


def run(steps, sinks, share, k, device="cpu", dtype=torch.float64, d=16, seed=0, check=None, window=0,
        lead=(0, 0, 0), history=None, strided=False):
    """``steps`` appends to a cache sized for them, by the op and by the reference, after ``lead[b]`` appends
    to sequence b alone (ragged lengths); returns both states. ``history`` (a list per sequence) collects the
    tokens appended, as (k, v) of ``[H, d]``. ``strided``: the op reads k and v as views (:func:`tokens`)."""
    n = steps + max(lead)
    slots = window + 1 if window else n // k + 2  # a window never writes past its W rows: the last stays NaN
    size = dict(k=k, d=d, S=slots, T=sinks + int(n * share) + k + 2, seed=seed, window=window)
    phase = holokv.phase_keys(k, d, dtype=dtype, device=device)
    ours, ref = state(dtype=dtype, device=device, **size), state(dtype=dtype, **size)
    g = torch.Generator().manual_seed(seed + 1)
    feeds = [(b, [b]) for b, m in enumerate(lead) for _ in range(m)] + [(None, list(range(len(lead))))] * steps
    for b, seqs in feeds:
        x = torch.randn(len(lead), 2, 3, d, generator=g).to(dtype)
        pick = slice(None) if b is None else slice(b, b + 1)  # a sequence alone: the op on views of its rows
        append(holokv.holo_append, tokens(x.to(device), pick, strided), phase, [t[pick] for t in ours], sinks, share,
               window)
        x = torch.stack(tokens(x, pick, False))
        append(holo_append_ref, x, phase.cpu(), [t[pick] for t in ref], sinks, share, window)
        for i, s in enumerate(seqs if history is not None else ()):
            history[s].append((x[0, i], x[1, i]))
        if check:
            check(ours, ref, phase)
    return ours, ref


def assert_same(ours, ref, k):
    """Same counters, bit-equal ring entries in use, slots equal up to the rounding of the sum's last step
    (the rest is NaN in both)."""
    assert [t.cpu().tolist() for t in ours[4:]] == [t.tolist() for t in ref[4:]]
    slot_lens, tail_lens, start = ref[4:7]
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
@pytest.mark.parametrize("strided", [False, True])
def test_cpu_matches_reference(k, sinks, share, strided):
    ours, ref = run(40, sinks, share, k, strided=strided)
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
    with pytest.raises(RuntimeError, match=r"v must have contiguous rows \(stride 1 along head_dim\)"):
        holokv.holo_append(x, x.transpose(1, 2).contiguous().transpose(1, 2), phase, *cache, 0, 0.0)
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
@pytest.mark.parametrize("strided", [False, True])
def test_cuda_matches_reference(dtype, k, sinks, share, d, strided):
    """The CUDA kernel sums a slot in fp32 in the same order as the reference: equal in every dtype."""
    ours, ref = run(60, sinks, share, k, device="cuda", dtype=dtype, d=d, strided=strided)
    assert_same(ours, ref, k)


@needs_cuda
def test_cuda_overflow_marks_the_sequence():
    phase = holokv.phase_keys(4, 64, device="cuda")
    cache = state(S=1, T=5, d=64, dtype=torch.float32, device="cuda")
    x = torch.randn(2, 3, 2, 64, device="cuda")
    for _ in range(12):
        holokv.holo_append(*x, phase, *cache, 0, 0.0)
    assert (cache[5] == 6).all()  # T + 1: holo_decode gives NaN for these sequences


# ---- the window of slots (block-level eviction) --------------------------------------------------------------
def assert_window_by_hand(ref, history, phase, sinks, k, window):
    """Each sequence holds its sinks, the last ``window`` slots superposed from its tokens (stream block g in
    row g mod window) and the stream tokens after them, exact (the rest of the capacity is NaN)."""
    slot_lens, tail_lens, start, evicted = ref[4:]
    T = ref[2].shape[2]
    for b, tokens in enumerate(history):
        sl, ev = int(slot_lens[b]), int(evicted[b])
        assert sl + ev + int(tail_lens[b]) == len(tokens) and sl <= window * k and ev % k == 0
        for x, slots, tail in zip((0, 1), ref[0:2], ref[2:4]):
            seq = torch.stack([t[x] for t in tokens], 1)  # [H, n, d]
            stream = superpose_ref(seq[None, :, sinks: sinks + sl + ev], phase)[0]  # [H, blocks, d]
            for g in range(ev // k, (sl + ev) // k):
                torch.testing.assert_close(slots[b, :, g % window], stream[:, g], rtol=1e-12, atol=1e-12)
            exact = [j for j in range(len(tokens)) if j < sinks or j >= sinks + sl + ev]
            rows = [(int(start[b]) + j) % T for j in range(len(exact))]
            assert torch.equal(tail[b][:, rows], seq[:, exact])


@pytest.mark.parametrize("window", [1, 2, 5])
@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("share", [0.0, 0.2])
def test_window_cpu_matches_reference(window, k, sinks, share):
    """Many steps past the wrap, ragged lengths: the op's window equals the reference's, whose slots are the last
    W blocks superposed from the tokens; row W of the slots is never written."""
    history = [[], [], []]
    ours, ref = run(80, sinks, share, k, window=window, lead=(0, 5, 13), history=history)
    assert_same(ours, ref, k)
    assert_window_by_hand(ref, history, holokv.phase_keys(k, 16, dtype=torch.float64), sinks, k, window)
    assert (ref[7] > window * k).all()  # every ring wrapped, more than once
    assert ours[0][:, :, window].isnan().all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_window_off_or_never_full_changes_nothing(device):
    """window_slots=0 (evicted given or not) and a window that never fills leave the cache bit for bit as the call
    without a window does, and evicted as it was."""
    k, sinks, share, d = 4, 3, 0.2, 64
    phase = holokv.phase_keys(k, d, device=device)
    caches = [state(d=d, S=20, T=30, dtype=torch.float32, device=device, window=1) for _ in range(3)]
    caches[1][7] += 8  # not read without a window
    g = torch.Generator().manual_seed(5)
    for _ in range(60):
        x = torch.randn(2, 3, 2, d, generator=g).to(device)
        holokv.holo_append(*x, phase, *caches[0][:7], sinks, share)
        holokv.holo_append(*x, phase, *caches[1][:7], sinks, share, 0, caches[1][7])
        holokv.holo_append(*x, phase, *caches[2][:7], sinks, share, 20, caches[2][7])
    assert int(caches[0][4].max()) == 12 * k  # slots closed, fewer than 20
    for cache, evicted in zip(caches[1:], (8, 0)):
        for a, b in zip(caches[0][:7], cache[:7]):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        assert (cache[7] == evicted).all()


def window_args(W=2, evicted=True, B=2, **kw):
    """append_args (tests/cases.py) with a window of W slots and, where asked, an evicted counter."""
    return {**append_args(B=B, **kw), "window_slots": W,
            **({"evicted": torch.zeros(B, dtype=torch.long)} if evicted else {})}


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("args, match", [
    (window_args(W=-1), "window_slots must be >= 0"),
    (window_args(evicted=False), "evicted must be given when window_slots > 0"),
    ({**window_args(), "evicted": torch.zeros(2, dtype=torch.int32)}, "evicted must be int64"),
    ({**window_args(), "evicted": torch.zeros(3, dtype=torch.long)}, r"evicted must be \[B\] = \[2\]"),
    ({**window_args(W=0), "evicted": torch.zeros(2, 2, dtype=torch.long)}, r"evicted must be \[B\] = \[2\]"),
], ids=["negative", "no-counter", "int32", "batch", "W0-shape"])
def test_window_bad_input(args, match, device):
    """The kernels and the fake kernel reject the same window arguments, naming them."""
    args = {n: v.to(device) if isinstance(v, torch.Tensor) else v for n, v in args.items()}
    with pytest.raises(RuntimeError, match=match):
        holokv.holo_append(**args)


@pytest.mark.parametrize("counters, match", [
    (dict(evicted=[1, 0]), r"evicted\[0\] = 1 must be a multiple of k = 4"),
    (dict(evicted=[0, 4]), r"evicted\[1\] = 4 .*nonzero only while all window_slots = 2 slots are held"),
    (dict(slot_lens=[12, 0]), r"slot_lens\[0\] = 12 must be a multiple of k = 4 in \[0, 8\]"),
])
def test_window_bad_counters_raise_on_cpu(counters, match):
    args = window_args()
    for name, value in counters.items():
        args[name] = torch.tensor(value)
    with pytest.raises(RuntimeError, match=match):
        holokv.holo_append(**args)


def test_window_past_capacity_raises_on_cpu():
    """A window wider than k_slots needs them grown before a slot closes past their rows."""
    args = window_args(W=5, S=3, T=40)
    args["sinks"], args["exact_share"] = 0, 0.0
    with pytest.raises(RuntimeError, match="needs slot 4 but k_slots holds 3 \\(grow the cache first\\)"):
        for _ in range(20):
            holokv.holo_append(**args)
    assert args["slot_lens"].tolist() == [12, 12] and args["evicted"].tolist() == [0, 0]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_opcheck_window(device):
    """Schema (the optional mutated counter), fake kernel and dispatch, on a ring that has wrapped."""
    phase = holokv.phase_keys(4, 16, device=device)
    cache = state(dtype=torch.float32, device=device, window=2, S=3, T=16)
    for t in cache[:4]:
        t.zero_()
    x = torch.randn(20, 2, 3, 2, 16, device=device)
    for step in x[:-1]:
        holokv.holo_append(*step, phase, *cache[:7], 2, 0.25, 2, cache[7])
    assert (cache[7] > 0).all()
    torch.library.opcheck(torch.ops.holokv.holo_append.default, (*x[-1], phase, *cache[:7], 2, 0.25, 2, cache[7]))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("window", [1, 2, 5])
@pytest.mark.parametrize("k, sinks, share", [(2, 0, 0.0), (4, 3, 0.2), (4, 0, 1 / 7), (2, 3, 0.3)])
def test_cuda_window_matches_reference(dtype, window, k, sinks, share):
    """The CUDA kernel's window equals the reference's over many wraps, ragged lengths, in fp32 and bf16."""
    ours, ref = run(120, sinks, share, k, device="cuda", dtype=dtype, d=64, window=window, lead=(0, 7, 3))
    assert_same(ours, ref, k)
    assert (ref[7] > window * k).all()
    assert ours[0][:, :, window].isnan().all()


@needs_cuda
def test_cuda_bad_window_counters_mark_the_sequence():
    args = {n: v.cuda() if isinstance(v, torch.Tensor) else v for n, v in window_args().items()}
    args["evicted"][0] = 4  # a full ring's count on an empty one: no state the op reaches
    holokv.holo_append(**args)
    assert args["tail_lens"].tolist() == [6, 1] and args["evicted"].tolist() == [4, 0]  # T + 1: NaN in decode


# ---- the window in the cache ---------------------------------------------------------------------------------
def superposed_by_steps(n, spec):
    """[n + 1]: stream tokens superposed (dropped ones included) once v = 0..n tokens were read, by stepping
    holo_append's counts: the rule on the tokens held, a full window dropping its oldest slots."""
    held = tail = dropped = 0
    out = []
    for _ in range(n + 1):
        close = closed_tokens_ref(held + tail, spec.sinks, spec.k, spec.exact_share) - held
        keep = min(held + close, spec.window_slots * spec.k) if spec.window_slots else held + close
        held, dropped, tail = keep, dropped + held + close - keep, tail + 1 - close
        out.append(held + dropped)
    return out


@pytest.mark.parametrize("window", [0, 1, 2, 5])
@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("k, ratio", [(2, 2), (2, 1.1), (4, 3), (4, 4), (8, 1.5), (8, 5)])
def test_closed_form_follows_the_steps(k, ratio, sinks, window):
    """HoloSpec.closed (what the prompt compresses and the superposed prefill masks) is what holo_append's steps
    reach: with a window, the rule on the tokens held returns every k tokens once the window first overflows."""
    spec = HoloSpec(k=k, ratio=ratio, sinks=sinks, window_slots=window)
    assert spec.closed(torch.arange(801)).tolist() == superposed_by_steps(800, spec)


def hand_built_decode(q, keys, values, spec, phase, scale, superposed):
    """holo_decode_ref over a cache built by hand from one sequence's tokens, keys and values [H, n, d] (the last
    one new): its sinks, its last window_slots slots of the ``superposed`` stream tokens, and the exact rest."""
    n, s, k = keys.shape[1], spec.sinks, spec.k
    held = min(superposed, spec.window_slots * k)
    exact = [j for j in range(n) if j < s or j >= s + superposed]
    slots = [superpose_ref(x[None, :, s + superposed - held: s + superposed], phase) for x in (keys, values)]
    return holo_decode_ref(q[None], *slots, phase, torch.tensor([held]), keys[None, :, exact], values[None, :, exact],
                           torch.tensor([len(exact)]), spec.mode, scale, spec.slot_gain)[0]


@pytest.mark.parametrize("mode", ["aligned", "full"])
@pytest.mark.parametrize("window, k, ratio, sinks", [(1, 2, 2, 0), (2, 4, 3, 3), (5, 4, 4, 3), (2, 8, 4, 4)])
def test_cache_window_reads_sinks_last_slots_and_tail(mode, window, k, ratio, sinks):
    """A HoloKV cache with window_slots decodes, at each of 200 steps after a ragged prompt, what holo_decode_ref
    reads over the sinks, the last W slots and the exact tail built by hand; its bytes and buffers stay bounded."""
    B, Hkv, G, d, n, pads, steps = 3, 2, 2, 16, 30, [0, 4, 11], 200
    g = torch.Generator().manual_seed(k + window)
    q, key, value = (torch.randn(B, h, n + steps, d, generator=g, dtype=torch.float64) for h in (Hkv * G, Hkv, Hkv))
    layer = HoloKVLayer(d, "half", ratio=ratio, k=k, sinks=sinks, mode=mode, slot_gain=1.5, window_slots=window)
    spec, scale = layer.spec, d ** -0.5
    i = torch.arange(n)
    mask = ((i[:, None] >= i) & (i >= torch.tensor(pads)[:, None, None]) | (i[:, None] == i))[:, None]
    layer.update(key[:, :, :n], value[:, :, :n])
    layer.attend(q[:, :, :n], mask, scale)
    by_steps = superposed_by_steps(n + steps, spec)
    per_slot = 2 * d * 8 * Hkv  # bytes of a slot (or an exact token) over the KV heads, fp64
    most = sinks + math.ceil(spec.first_eviction * spec.exact_share) + k + 1 + window  # per sequence
    sizes = []
    for t in range(n, n + steps):
        layer.update(key[:, :, t: t + 1], value[:, :, t: t + 1])
        out = layer.attend(q[:, :, t: t + 1], None, scale)[:, 0]
        for b, p in enumerate(pads):
            want = hand_built_decode(q[b, :, t], key[b, :, p: t + 1], value[b, :, p: t + 1], spec, layer.store.phase,
                                     scale, by_steps[t - p])
            torch.testing.assert_close(out[b], want, rtol=1e-10, atol=1e-10)
        assert layer.nbytes() <= B * most * per_slot
        sizes.append((layer.store.capacity, layer.store.k_slots.shape[2]))
    assert (layer.store.evicted > 4 * window * k).all()  # the window wrapped, and kept wrapping
    assert len(set(sizes[steps // 2:])) == 1  # no buffer grows once the window is full
