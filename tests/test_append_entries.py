"""append_entries (one new entry per sequence into the entries holo_decode reads) against its reference over many
steps: ragged and per-head lengths, with and without a log-mass, every dtype and row sizes whose copies take
pieces of 16 down to 2 bytes; a full cache raises on CPU and reads as NaN on CUDA; bad input is named."""
import functools

import pytest
import torch

import holokv
from holokv.reference import append_entries_ref

from cases import bad_tokens, edited, entries_args
from conftest import dtype_id, needs_cuda

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def cache(B, H, cap, d, dtype, device, per_head, bias, seed=0, offset=0):
    """NaN-filled buffers (nothing may read past a length), lengths ragged by sequence (and head); ``offset``
    elements shift the caches' start, so that no wide piece fits their alignment."""
    g = torch.Generator().manual_seed(seed)
    nan = lambda *s: torch.full((offset + torch.Size(s).numel(),), float("nan"), dtype=dtype,  # noqa: E731
                                device=device)[offset:].view(s)
    lens = torch.randint(0, cap // 2, (B, H) if per_head else (B,), generator=g).to(device)
    return [nan(B, H, cap, d), nan(B, H, cap, d), lens, nan(B, H, cap) if bias else None]


def run(steps, B, H, d, dtype, device, per_head, bias, offset=0, strided=False):
    """``strided``: the op reads k and v as views at the batch and head strides of a fused projection's output
    (one buffer, rows apart), which also narrows the pieces their alignment allows."""
    ours = cache(B, H, 2 * steps + 8, d, dtype, device, per_head, bias, offset=offset)
    ref = [t.cpu().clone() if t is not None else None for t in ours]
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(B, H, 3, d, generator=g, dtype=torch.float64).to(dtype)
        k, v = (x.to(device)[:, :, i] for i in (0, 2))
        holokv.append_entries(*((k, v) if strided else (k.contiguous(), v.contiguous())), *ours)
        append_entries_ref(x[:, :, 0], x[:, :, 2], *ref)
    return ours, ref


def assert_same(ours, ref, steps):
    """Equal lengths, and equal caches bit for bit: each row of each step written once, the rest still NaN."""
    assert torch.equal(ours[2].cpu(), ref[2])
    for a, r in zip(ours[:2] + ours[3:], ref[:2] + ref[3:]):
        if r is not None:
            assert torch.equal(a.cpu().nan_to_num(7.0), r.nan_to_num(7.0))
    assert (~ref[0].isnan().any(-1)).sum(-1).eq(steps).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_cpu_matches_reference(dtype, per_head, bias, strided):
    assert_same(*run(12, 3, 2, 16, dtype, "cpu", per_head, bias, strided=strided), 12)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("d, offset", [(128, 0), (64, 0), (6, 0), (128, 1)])  # 16-byte pieces down to 2-byte ones
@pytest.mark.parametrize("strided", [False, True])
def test_cuda_matches_reference(dtype, per_head, bias, d, offset, strided):
    assert_same(*run(20, 5, 8, d, dtype, "cuda", per_head, bias, offset, strided), 20)


def test_full_cache_raises_on_cpu_before_writing():
    args = entries_args()
    args["lens"][1] = args["k_cache"].shape[2]
    before = {n: t.clone() for n, t in args.items()}
    with pytest.raises(RuntimeError, match=r"lens\[b\] = 5 at row 1 must lie in \[0, 5\)"):
        holokv.append_entries(**args)
    assert all(torch.equal(args[n], t) for n, t in before.items())


@needs_cuda
@pytest.mark.parametrize("per_head", [False, True])
def test_cuda_full_cache_reads_as_nan(per_head):
    """A sequence (or head) at capacity writes nothing and its length becomes cap + 1, so holo_decode gives NaN
    for that sequence and the others decode as before."""
    args = {n: t.cuda() for n, t in entries_args(d=64, per_head=per_head).items()}  # a head_dim holo_decode serves
    cap = args["k_cache"].shape[2]
    args["lens"][1] = cap
    k_before = args["k_cache"].clone()
    for _ in range(2):
        holokv.append_entries(**args)
    assert args["lens"][1].eq(cap + 1).all() and args["lens"][0].eq(2).all()
    assert torch.equal(args["k_cache"][1], k_before[1])
    q = torch.randn(2, 4, 64, device="cuda")
    none = args["k_cache"][:, :, :0]
    phase = holokv.phase_keys(1, 64, device="cuda")
    out = holokv.holo_decode(q, none, none, phase, torch.zeros(2, dtype=torch.long, device="cuda"), args["k_cache"],
                             args["v_cache"], args["lens"], tail_bias=args["bias"])
    assert out[1].isnan().all() and out[0].isfinite().all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("per_head", [False, True])
def test_opcheck(device, per_head):
    args = {n: t.to(device) for n, t in entries_args(per_head=per_head).items()}
    torch.library.opcheck(torch.ops.holokv.append_entries.default, tuple(args.values()))


def bad_entries():
    edit = functools.partial(edited, entries_args)
    return [
        *bad_tokens(edit, "v_cache"),
        (edit(k=lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)), r"k must have contiguous rows"),
        (edit(k_cache=lambda t: t[:, :1].contiguous()), r"k_cache must be \[B, Hkv, len, head_dim\]"),
        (edit(v_cache=lambda t: t[:, :, :2].contiguous()), "v_cache holds 2 entries"),
        (edit(k_cache=lambda t: t.transpose(2, 3)), "k_cache must be contiguous"),
        (edit(lens=lambda t: t.int()), "lens must be int64"),
        (edit(lens=lambda t: t[None]), r"lens must be \[B\] = \[2\] or \[B, Hkv\]"),
        (edit(bias=lambda t: t[:, :, :3].contiguous()), r"bias must be \[B, Hkv, len\]"),
    ]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("args, match", bad_entries())
def test_rejects_bad_input(args, match, device):
    args = {n: v.to(device) for n, v in args.items()}
    with pytest.raises(RuntimeError, match=match):
        holokv.append_entries(**args)
