"""Fake (meta) kernels: output shapes for torch.compile, FakeTensor and opcheck."""
import torch


@torch.library.register_fake("holokv::superpose")
def _superpose_fake(x, keys):
    B, H, N, d = x.shape
    k = keys.shape[0]
    return x.new_empty(B, H, (N + k - 1) // k, d)


@torch.library.register_fake("holokv::holo_decode")
def _holo_decode_fake(q, k_slots, v_slots, keys, slot_lens, k_tail, v_tail, tail_lens, mode="full", scale=None,
                      slot_gain=1.0, tail_bias=None):
    torch._check(q.shape[1] % k_slots.shape[1] == 0, lambda: "Hq must be a multiple of Hkv")
    return torch.empty_like(q)


@torch.library.register_fake("holokv::batched_eigh")
def _batched_eigh_fake(a):
    batch, n, _ = a.shape
    return a.new_empty(batch, n), torch.empty_like(a).mT, a.new_empty(batch, dtype=torch.int32)


@torch.library.register_fake("holokv::batched_cholesky_solve")
def _batched_cholesky_solve_fake(a, b):
    batch, n, k = b.shape
    return b.new_empty(batch, k, n).mT, a.new_empty(batch, dtype=torch.int32)
