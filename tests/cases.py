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
