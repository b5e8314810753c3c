"""Random decode problems shared by the CPU and CUDA tests."""
from dataclasses import dataclass

import torch

import holokv


@dataclass
class DecodeCase:
    q: torch.Tensor
    k_slots: torch.Tensor
    v_slots: torch.Tensor
    keys: torch.Tensor
    slot_lens: torch.Tensor
    k_tail: torch.Tensor
    v_tail: torch.Tensor
    tail_lens: torch.Tensor

    def args(self):
        return (self.q, self.k_slots, self.v_slots, self.keys, self.slot_lens, self.k_tail, self.v_tail,
                self.tail_lens)

    def to(self, dtype):
        cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
        return DecodeCase(*[cast(t) for t in self.args()])


def decode_case(sup_lens, tail_lens, hkv=2, group=3, head_dim=64, k=4, dtype=torch.float32, device="cpu",
                rope_layout="half", seed=0, extra_slots=1, extra_tail=2):
    """Superposes real random tokens (so slots hold what superpose makes), with
    capacity beyond the longest sequence so that ragged lengths are exercised."""
    g = torch.Generator().manual_seed(seed)
    B = len(sup_lens)
    keys = holokv.phase_keys(k, head_dim, rope_layout)
    n_tok = k * (-(-max(sup_lens) // k) + extra_slots)
    T = max(tail_lens) + extra_tail
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    k_tok, v_tok = rnd(B, hkv, n_tok, head_dim), rnd(B, hkv, n_tok, head_dim)
    for b, n in enumerate(sup_lens):  # tokens past slot_lens do not exist: a partial slot sums only its own
        k_tok[b, :, n:] = 0
        v_tok[b, :, n:] = 0
    case = DecodeCase(rnd(B, hkv * group, head_dim), holokv.superpose(k_tok, keys.double()),
                      holokv.superpose(v_tok, keys.double()), keys.double(),
                      torch.tensor(sup_lens, dtype=torch.int64), rnd(B, hkv, T, head_dim),
                      rnd(B, hkv, T, head_dim), torch.tensor(tail_lens, dtype=torch.int64))
    case = DecodeCase(*[t.to(device) for t in case.args()])
    return case.to(dtype)


def reference_drift(same, ref):
    """How far the reference at the inputs' dtype (``same``) strays from the float64 one (``ref``), over the entries
    finite in both: a kernel at that dtype may stray as far (large logits with near ties lose more to rounding than
    a fixed tolerance allows)."""
    finite = same.isfinite() & ref.isfinite()
    return (same.double() - ref)[finite].abs().max().item() if finite.any() else 0.0


def decode_args():
    """holo_decode's arguments by name, every optional one given: a small valid problem on CPU."""
    case = decode_case([9, 3], [2, 1], k=4, group=3)
    return dict(q=case.q, k_slots=case.k_slots, v_slots=case.v_slots, phase=case.keys, slot_lens=case.slot_lens,
                k_tail=case.k_tail, v_tail=case.v_tail, tail_lens=case.tail_lens,
                tail_bias=torch.zeros(case.k_tail.shape[:3]), tail_start=torch.zeros(2, dtype=torch.long))


def append_args(B=2, H=2, S=3, T=5, d=16, k=4):
    """holo_append's arguments by name: new tokens for an empty cache on CPU."""
    zeros = lambda *s: torch.zeros(*s, dtype=torch.long)  # noqa: E731
    return dict(k=torch.randn(B, H, d), v=torch.randn(B, H, d), phase=holokv.phase_keys(k, d),
                k_slots=torch.zeros(B, H, S, d), v_slots=torch.zeros(B, H, S, d), k_tail=torch.zeros(B, H, T, d),
                v_tail=torch.zeros(B, H, T, d), slot_lens=zeros(B), tail_lens=zeros(B), tail_start=zeros(B),
                sinks=1, exact_share=0.5)


def entries_args(B=2, H=2, cap=5, d=16, per_head=False):
    """append_entries' arguments by name, every optional one given: new entries for an empty cache on CPU."""
    return dict(k=torch.randn(B, H, d), v=torch.randn(B, H, d), k_cache=torch.zeros(B, H, cap, d),
                v_cache=torch.zeros(B, H, cap, d), lens=torch.zeros((B, H) if per_head else (B,), dtype=torch.long),
                bias=torch.ones(B, H, cap))


def edited(make, **changes):
    """``make()``'s arguments, those named in ``changes`` replaced by the function given of their value."""
    args = make()
    for name, fn in changes.items():
        args[name] = fn(args[name])
    return args


def bad_tokens(edit, cache_name: str):
    """The bad new tokens holo_append and append_entries reject alike (the shared checks of an append's k, v and
    cache), as (arguments, message) cases; ``edit``: :func:`edited` of the op's arguments."""
    return [
        (edit(k=lambda t: t.int()), "k must be a floating-point"),
        (edit(k=lambda t: t[None]), r"k must be \[B, Hkv, head_dim\]"),
        (edit(v=lambda t: t[:1]), r"v must be \[B, Hkv, head_dim\]"),
        (edit(**{cache_name: lambda t: t.double()}), f"{cache_name} has dtype"),
    ]
