"""Property-based fuzz (hypothesis) of every op against its reference: random valid shapes, ragged and
per-head lengths, ring offsets, GQA ratios, k, modes and dtypes. Unused capacity is filled with NaN, which
must never reach an output; non-finite inputs must give NaN exactly where the reference does. Each problem
is drawn as sizes and a seed (tensors come from the seed), so hypothesis shrinks a failure to small sizes.
Bounded for CI (well under a minute on CPU); the same properties run on CUDA against the same references,
computed on CPU (HOLOKV_FUZZ_SCALE scales the example counts: memcheck runs a tenth)."""
import os

import pytest
import torch

pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis (the test extra; scripts/setup.sh installs it)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import holokv
from holokv.reference import closed_tokens_ref, holo_append_ref, holo_decode_ref, superpose_ref

from cases import reference_drift
from conftest import needs_cuda

DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
DTYPES = {"cpu": [torch.float64, torch.float32, torch.bfloat16], "cuda": [torch.float16, torch.bfloat16, torch.float32]}
# rounding of the outputs (and, on CUDA, of the tensor cores' P) at each dtype
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
SLOT_TOL = {**TOL, torch.float64: 1e-5}  # holo_append_ref sums a slot in float32 whatever the dtype
PHASE_COUNTS = [1, 2, 4, 8, 16]
NAN, INF = float("nan"), float("inf")
SCALE = float(os.environ.get("HOLOKV_FUZZ_SCALE", "1"))


def fuzz(examples):
    return settings(max_examples=max(1, round(examples * SCALE)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def head_dims(device, k):
    """CUDA's decode reads head_dim 64 and 128; on CPU any multiple of 2k (phase_keys') down to 8."""
    return [64, 128] if device == "cuda" else [d for d in (8, 16, 32, 64, 128) if d % (2 * k) == 0]


def randn(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def on(device, tensors: dict) -> dict:
    """A copy of the tensors on device (a copy on CPU too: holo_append mutates its arguments)."""
    return {n: v.to(device, copy=True) if isinstance(v, torch.Tensor) else v for n, v in tensors.items()}


def float64(tensors: dict) -> dict:
    return {n: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for n, v in tensors.items()}


def assert_close(out, ref, tol):
    """Same NaN positions, the rest within tol (relative and absolute); out may be on the GPU, ref on CPU."""
    out = out.cpu()
    assert torch.equal(out.isnan(), ref.isnan())
    torch.testing.assert_close(out.double(), ref.double(), rtol=tol, atol=tol, equal_nan=True)


# ---- superpose -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
@fuzz(300)
def test_superpose(device, data):
    k = data.draw(st.sampled_from(PHASE_COUNTS))
    B, H, N = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)), data.draw(st.integers(0, 40))
    d = data.draw(st.sampled_from(head_dims("cpu", k)))
    dtype = data.draw(st.sampled_from(DTYPES[device]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    x = randn(gen, B, H, N, d, dtype=dtype)
    poison = data.draw(st.sampled_from([None, NAN, INF, -INF])) if N else None
    if poison is not None:  # one token: its slot is NaN or infinite in that dimension, the others untouched
        x[0, 0, data.draw(st.integers(0, N - 1)), 0] = poison
    phase = holokv.phase_keys(k, d, data.draw(st.sampled_from(["half", "interleaved"])))
    assert_close(holokv.superpose(x.to(device), phase.to(device)), superpose_ref(x.double(), phase.double()),
                 TOL[dtype])


# ---- holo_decode -----------------------------------------------------------------------------------------

def unused_rows(lens, start, T):
    """[..., T] bool: the rows of a ring of T rows outside [start, start + lens) (mod T)."""
    return (torch.arange(T, device=lens.device) - start[..., None]) % max(T, 1) >= lens[..., None]


@st.composite
def decode_problems(draw, device):
    k = draw(st.sampled_from(PHASE_COUNTS))
    B, Hkv, G = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.sampled_from([1, 3, 4, 8]))
    S, T = draw(st.integers(0, 5)), draw(st.integers(0, 10))
    per_head = draw(st.booleans())
    n_lens = B * Hkv if per_head else B
    return dict(
        k=k, B=B, Hkv=Hkv, G=G, S=S, T=T, D=draw(st.sampled_from(head_dims(device, k))),
        slot_lens=draw(st.lists(st.integers(0, S * k), min_size=B, max_size=B)),
        tail_lens=draw(st.lists(st.integers(0, T), min_size=n_lens, max_size=n_lens)), per_head=per_head,
        tail_start=draw(st.none() | st.lists(st.integers(0, max(T - 1, 0)), min_size=n_lens, max_size=n_lens)),
        bias=draw(st.sampled_from([None, "finite", "masked"])), mode=draw(st.sampled_from(["aligned", "full"])),
        scale=draw(st.none() | st.floats(0.05, 1.0)), slot_gain=draw(st.floats(0.25, 3.0)),
        dtype=draw(st.sampled_from(DTYPES[device])), seed=draw(st.integers(0, 2**31)),
        poison=draw(st.sampled_from([None, "q", "key", "value", "bias", "bias +inf", "scale"])))


def decode_inputs(p):
    """holo_decode's arguments for problem p (on CPU), NaN wherever the lengths say nothing is held, and the
    poison."""
    gen = torch.Generator().manual_seed(p["seed"])
    B, Hkv, S, T, D, k = p["B"], p["Hkv"], p["S"], p["T"], p["D"], p["k"]
    rand = lambda *shape: randn(gen, *shape, dtype=p["dtype"])  # noqa: E731
    lens = lambda v: torch.tensor(v).view(B, Hkv) if p["per_head"] else torch.tensor(v)  # noqa: E731
    a = dict(q=rand(B, Hkv * p["G"], D), k_slots=rand(B, Hkv, S, D), v_slots=rand(B, Hkv, S, D),
             phase=holokv.phase_keys(k, D), slot_lens=torch.tensor(p["slot_lens"]),
             k_tail=rand(B, Hkv, T, D), v_tail=rand(B, Hkv, T, D), tail_lens=lens(p["tail_lens"]),
             mode=p["mode"], scale=p["scale"], slot_gain=p["slot_gain"], tail_bias=None,
             tail_start=None if p["tail_start"] is None else lens(p["tail_start"]))
    if p["bias"]:
        a["tail_bias"] = rand(B, Hkv, T)
        if p["bias"] == "masked":  # some exact tokens dropped; some rows may have nothing left
            a["tail_bias"].masked_fill_(torch.rand(B, Hkv, T, generator=gen) < 0.5, -INF)
    starts = torch.zeros(B, Hkv, dtype=torch.long) if a["tail_start"] is None else a["tail_start"]
    unused_tail = unused_rows(a["tail_lens"].view(B, -1).expand(B, Hkv), starts.view(B, -1).expand(B, Hkv), T)
    unused_slots = torch.arange(S) >= (a["slot_lens"][:, None] + k - 1) // k  # [B, S]
    for name in ("k_slots", "v_slots"):
        a[name][unused_slots[:, None].expand(B, Hkv, S)] = NAN
    for name in ("k_tail", "v_tail", "tail_bias"):
        if a[name] is not None:
            a[name][unused_tail] = NAN
    poison(a, p["poison"], unused_slots, unused_tail)
    return a


def poison(a, what, unused_slots, unused_tail):
    """One non-finite input where the kernels read it (a used entry, q, scale), if the problem has one."""
    if what == "q":
        a["q"][0, 0, 0] = NAN
    elif what == "scale":
        a["scale"] = NAN
    elif what in ("key", "value"):
        used = (~unused_tail).nonzero()
        if len(used):
            a["k_tail" if what == "key" else "v_tail"][tuple(used[0])] = NAN
        elif (~unused_slots).any():
            b, s = (~unused_slots).nonzero()[0].tolist()
            a["k_slots" if what == "key" else "v_slots"][b, 0, s] = NAN
    elif what in ("bias", "bias +inf") and a["tail_bias"] is not None and (~unused_tail).any():
        a["tail_bias"][tuple((~unused_tail).nonzero()[0])] = NAN if what == "bias" else INF


@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
@fuzz(1500)
def test_holo_decode(device, data):
    p = data.draw(decode_problems(device))
    a = decode_inputs(p)
    out = holokv.holo_decode(**on(device, a))
    ref = holo_decode_ref(**float64(a))
    assert out.dtype == p["dtype"]
    if p["poison"] is None:  # the NaN-filled capacity never reached an output
        assert torch.isfinite(out).all()
    # the reference drifts at the dtype too: float32 by 2.8e-4 on a problem with large logits (scale 1, slot gain 2,
    # d = 128) and near ties, where the kernel was 2.4e-4 off
    assert_close(out, ref, TOL[p["dtype"]] + 2 * reference_drift(holo_decode_ref(**a), ref))


# ---- holo_append -----------------------------------------------------------------------------------------

@st.composite
def append_problems(draw, device):
    k, B, H, sinks = draw(st.sampled_from(PHASE_COUNTS)), draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(
        st.integers(0, 6))
    ratio = draw(st.floats(1.0, float(k)))  # HoloKV's exact share for this ratio (HoloSpec), or any share
    share = draw(st.sampled_from([1.0 if k == 1 else (1 / ratio - 1 / k) / (1 - 1 / k), draw(st.floats(0, 1))]))
    # reachable starting points: valid tokens held, of which any whole slots already due are superposed
    valid = draw(st.lists(st.integers(0, 30), min_size=B, max_size=B))
    slot_lens = [k * draw(st.integers(0, closed_tokens_ref(v, sinks, k, share) // k)) for v in valid]
    steps = draw(st.integers(1, 12))
    T = max(v - s for v, s in zip(valid, slot_lens)) + steps + draw(st.integers(1, 3))
    return dict(k=k, B=B, H=H, sinks=sinks, share=share, valid=valid, slot_lens=slot_lens, steps=steps, T=T,
                S=-(-(max(valid) + steps) // k) + draw(st.integers(0, 2)),
                start=draw(st.lists(st.integers(0, T - 1), min_size=B, max_size=B)),
                D=draw(st.sampled_from(head_dims("cpu", k))), dtype=draw(st.sampled_from(DTYPES[device])),
                seed=draw(st.integers(0, 2**31)))


@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
@fuzz(400)
def test_holo_append(device, data):
    """Append after append from a random reachable state: the counters equal the reference's, the tail ring
    (copies) exactly, the slots (sums) to rounding, and NaN in unused capacity never reaches a held row."""
    p = data.draw(append_problems(device))
    gen = torch.Generator().manual_seed(p["seed"])
    B, H, S, T, D, k = p["B"], p["H"], p["S"], p["T"], p["D"], p["k"]
    rand = lambda *shape: randn(gen, *shape, dtype=p["dtype"])  # noqa: E731
    slot_lens, start = torch.tensor(p["slot_lens"]), torch.tensor(p["start"])
    tail_lens = torch.tensor(p["valid"]) - slot_lens
    expected = dict(k_slots=rand(B, H, S, D), v_slots=rand(B, H, S, D), k_tail=rand(B, H, T, D),
                    v_tail=rand(B, H, T, D), slot_lens=slot_lens, tail_lens=tail_lens, tail_start=start)
    for name in ("k_slots", "v_slots"):
        expected[name][(torch.arange(S) >= slot_lens[:, None] // k)[:, None].expand(B, H, S)] = NAN
    for name in ("k_tail", "v_tail"):
        expected[name][unused_rows(tail_lens, start, T)[:, None].expand(B, H, T)] = NAN
    state = on(device, expected)  # the op's copy; the reference updates `expected` on CPU
    phase = holokv.phase_keys(k, D)
    for _ in range(p["steps"]):
        x, y = rand(B, H, D), rand(B, H, D)
        holo_append_ref(x, y, phase, **expected, sinks=p["sinks"], exact_share=p["share"])
        holokv.holo_append(x.to(device), y.to(device), phase.to(device), **state, sinks=p["sinks"],
                           exact_share=p["share"])
        for name in ("slot_lens", "tail_lens", "tail_start"):
            assert torch.equal(state[name].cpu(), expected[name]), name
        held_rows = ~unused_rows(expected["tail_lens"], expected["tail_start"], T)[:, None].expand(B, H, T)
        held_slots = (torch.arange(S) < expected["slot_lens"][:, None] // k)[:, None].expand(B, H, S)
        for name, held, tol in (("k_tail", held_rows, 0.0), ("v_tail", held_rows, 0.0),
                                ("k_slots", held_slots, SLOT_TOL[p["dtype"]]),
                                ("v_slots", held_slots, SLOT_TOL[p["dtype"]])):
            assert_close(state[name], expected[name], tol)
            assert torch.isfinite(expected[name][held]).all()


# ---- batched_eigh and batched_cholesky_solve -------------------------------------------------------------

def symmetric_upper(a):
    """The symmetric matrix whose upper triangle is a's (the one the ops read)."""
    upper = a.triu()
    return upper + upper.triu(1).mT


@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
@fuzz(300)
def test_batched_eigh(device, data):
    batch, n = data.draw(st.integers(0, 4)), data.draw(st.integers(1, 40))
    rank = data.draw(st.integers(1, n))  # rank-deficient input has exact zero eigenvalues
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    x = torch.randn(batch, n, rank, generator=gen, dtype=torch.float64)
    a = (x @ x.mT / rank - data.draw(st.floats(0, 2)) * torch.eye(n, dtype=torch.float64)).float()
    a += 100 * torch.randn(batch, n, n, generator=gen).tril(-1)  # garbage in the triangle that is not read
    bad = torch.zeros(batch, dtype=torch.bool)
    if batch and data.draw(st.booleans()):  # a non-finite entry in the read triangle of one matrix
        i, j = sorted(data.draw(st.lists(st.integers(0, n - 1), min_size=2, max_size=2)))
        a[0, i, j], bad[0] = data.draw(st.sampled_from([NAN, INF, -INF])), True
    w, v, info = holokv.batched_eigh(a.to(device))
    w, v, info = w.cpu().double(), v.cpu().double(), info.cpu()
    assert torch.equal(info != 0, bad) and (info[bad] == -1).all()
    assert w[bad].isnan().all() and v[bad].isnan().all()
    sym = symmetric_upper(a[~bad].double())
    scale = sym.flatten(1).abs().amax(1).clamp(min=1)[:, None]
    w_ref = torch.linalg.eigvalsh(sym)
    assert ((w[~bad] - w_ref).abs() <= 5e-4 * scale).all()  # float32 input: n·eps·|a| at worst
    good = v[~bad]
    assert ((good.mT @ good - torch.eye(n, dtype=torch.float64)).abs() <= 5e-4).all()
    assert ((good @ torch.diag_embed(w[~bad]) @ good.mT - sym).abs() <= 5e-4 * scale[..., None]).all()


@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
@fuzz(300)
def test_batched_cholesky_solve(device, data):
    batch, n, cols = data.draw(st.integers(0, 4)), data.draw(st.integers(1, 40)), data.draw(st.integers(0, 4))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    x = torch.randn(batch, n, n, generator=gen, dtype=torch.float64)
    a = x @ x.mT / n + data.draw(st.floats(0.1, 1.0)) * torch.eye(n, dtype=torch.float64)  # condition < ~50
    singular = torch.zeros(batch, dtype=torch.bool)
    if batch and data.draw(st.booleans()):
        a[-1], singular[-1] = 0, True
    b = torch.randn(batch, n, cols, generator=gen, dtype=torch.float64)
    garbage = 100 * torch.randn(batch, n, n, generator=gen, dtype=torch.float64).tril(-1)
    sol, info = holokv.batched_cholesky_solve((a.triu() + garbage).float().to(device), b.float().to(device))
    sol, info = sol.cpu().double(), info.cpu()
    assert sol.shape == b.shape and torch.equal(info != 0, singular) and (sol[singular] == 0).all()
    ref = torch.linalg.solve(a[~singular], b[~singular])
    scale = 1 + (ref.abs().max().item() if ref.numel() else 0)
    assert ((sol[~singular] - ref).abs() <= 1e-3 * scale).all()
