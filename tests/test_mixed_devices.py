"""One argument on meta, the others on CPU: whichever kernel the dispatcher picks (the fake kernel, or the
CPU kernel handed a meta tensor), the call raises and names that argument, never returning uninitialized
memory. And holo_append's fake rejects what its kernel rejects."""
import functools

import pytest
import torch

import holokv

from cases import append_args, bad_tokens, decode_args, edited, entries_args

ops = torch.ops.holokv


# op -> (its arguments, the argument the others must share a device with); tail_bias is checked against k_tail
OPS = {
    "superpose": (lambda: dict(x=torch.randn(1, 2, 8, 16), phase=holokv.phase_keys(4, 16)), "x"),
    "holo_decode": (decode_args, "q"),
    "holo_append": (append_args, "k"),
    "append_entries": (entries_args, "k"),
    "batched_cholesky_solve": (lambda: dict(a=torch.eye(3).expand(2, 3, 3).contiguous(), b=torch.randn(2, 3, 1)),
                               "a"),
}
CASES = [(op, name) for op, (make, _) in OPS.items() for name, v in make().items() if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("op, name", CASES, ids=[f"{op}-{name}" for op, name in CASES])
@pytest.mark.parametrize("on_meta", ["it", "the others"])
def test_one_argument_on_another_device(op, name, on_meta):
    make, ref = OPS[op]
    args = make()
    if on_meta == "it":
        args[name] = args[name].to("meta")
    else:
        args = {n: v.to("meta") if isinstance(v, torch.Tensor) and n != name else v for n, v in args.items()}
    on, others_on = ("meta", "cpu") if on_meta == "it" else ("cpu", "meta")
    if name == ref:  # the first argument checked against it names the other side
        match = f"is on {others_on} but {ref} is on {on}"
    else:
        match = f"{name} is on {on} but {'k_tail' if name == 'tail_bias' else ref} is on {others_on}"
    with pytest.raises(RuntimeError, match=match):
        getattr(ops, op)(**args)


def bad_appends():
    edit = functools.partial(edited, append_args)
    return [
        *bad_tokens(edit, "v_tail"),
        (edit(k_slots=lambda t: t[:, :1]), r"k_slots must be \[B, Hkv, len, head_dim\]"),
        (edit(v_slots=lambda t: t[:, :, :2]), "v_slots holds 2 slots"),
        (edit(k_tail=lambda t: t[:, :, :0], v_tail=lambda t: t[:, :, :0]), "k_tail must have room"),
        (edit(phase=lambda t: t[:3]), "power of two"),
        (edit(tail_lens=lambda t: t.int()), "tail_lens must be int64"),
        (edit(tail_start=lambda t: t[None]), r"tail_start must be \[B\]"),
        (edit(sinks=lambda s: -1), "sinks must be >= 0"),
        (edit(exact_share=lambda f: 1.5), r"exact_share must lie in \[0, 1\]"),
    ]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("args, match", bad_appends())
def test_append_rejects_bad_input(args, match, device):
    args = {n: v.contiguous().to(device) if isinstance(v, torch.Tensor) else v for n, v in args.items()}
    with pytest.raises(RuntimeError, match=match):
        ops.holo_append(**args)
