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
