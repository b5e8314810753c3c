"""Fake (meta) kernels: output shapes for torch.compile, FakeTensor and opcheck, after the real kernels'
argument checks (checks.py), so that meta tensors, alone or mixed with others, fail as the real op does."""
import torch

from . import checks


@torch.library.register_fake("holokv::superpose")
def _superpose_fake(x, phase):
    checks.superpose(x, phase)
    B, H, N, d = x.shape
    k = phase.shape[0]
    return x.new_empty(B, H, (N + k - 1) // k, d)


@torch.library.register_fake("holokv::holo_decode")
def _holo_decode_fake(q, k_slots, v_slots, phase, slot_lens, k_tail, v_tail, tail_lens, mode="full", scale=None,
                      slot_gain=1.0, tail_bias=None, tail_start=None):
    checks.holo_decode(q, k_slots, v_slots, phase, slot_lens, k_tail, v_tail, tail_lens, mode, tail_bias, tail_start)
    return torch.empty_like(q)


@torch.library.register_fake("holokv::holo_append")
def _holo_append_fake(k, v, phase, k_slots, v_slots, k_tail, v_tail, slot_lens, tail_lens, tail_start, sinks,
                      exact_share, window_slots=0, evicted=None):
    checks.holo_append(k, v, phase, k_slots, v_slots, k_tail, v_tail, slot_lens, tail_lens, tail_start, sinks,
                       exact_share, window_slots, evicted)
    return None  # mutates its cache arguments in place


@torch.library.register_fake("holokv::append_entries")
def _append_entries_fake(k, v, k_cache, v_cache, lens, bias=None):
    checks.append_entries(k, v, k_cache, v_cache, lens, bias)
    return None  # mutates its cache arguments in place


@torch.library.register_fake("holokv::batched_eigh")
def _batched_eigh_fake(a):
    checks.batched_eigh(a)
    batch, n, _ = a.shape
    return a.new_empty(batch, n), torch.empty_like(a).mT, a.new_empty(batch, dtype=torch.int32)


@torch.library.register_fake("holokv::batched_cholesky_solve")
def _batched_cholesky_solve_fake(a, b):
    checks.batched_cholesky_solve(a, b)
    batch, n, k = b.shape
    return b.new_empty(batch, k, n).mT, a.new_empty(batch, dtype=torch.int32)
