"""Argument checks of the fake (meta) kernels: cpp/checks.h's rules, in its order and with its messages, so
that meta tensors, FakeTensor and torch.compile reject what the CPU and CUDA kernels reject. The checks that
read tensor values (lengths within capacity) stay with the kernels. ``torch._check`` raises RuntimeError, as
TORCH_CHECK does, and keeps symbolic sizes symbolic (a guard, not a specialization)."""
from __future__ import annotations

import torch

PHASE_COUNTS = (1, 2, 4, 8, 16)


def check(cond, *message) -> None:
    torch._check(cond, lambda: "".join(str(m) for m in message))


def shape(t: torch.Tensor) -> list:
    return list(t.shape)


def float_tensor(t: torch.Tensor, name: str) -> None:
    check(t.is_floating_point(), name, " must be a floating-point tensor, got ", t.dtype)
    check(t.is_contiguous(), name, " must be contiguous (call .contiguous() first)")


def same_device(t: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
    check(t.device == ref.device, name, " is on ", t.device, " but ", ref_name, " is on ", ref.device)


def phase(ph: torch.Tensor, x: torch.Tensor, x_name: str) -> None:
    float_tensor(ph, "phase")
    same_device(ph, x, "phase", x_name)
    check(ph.dim() == 2, "phase must be [k, head_dim], got ", shape(ph))
    check(ph.shape[0] in PHASE_COUNTS, "phase.size(0) = k must be a power of two in {1,2,4,8,16}, got ",
          ph.shape[0])
    check(ph.shape[1] == x.shape[-1], "phase.size(1) = ", ph.shape[1], " must equal ", x_name,
          ".size(-1) = head_dim = ", x.shape[-1])


def superpose(x: torch.Tensor, ph: torch.Tensor) -> None:
    float_tensor(x, "x")
    check(x.dim() == 4, "x must be [B, H, N, head_dim], got ", shape(x))
    check(x.shape[3] % 2 == 0, "x: head_dim must be even, got ", x.shape[3])
    phase(ph, x, "x")


def lens(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str, B, Hkv, per_head_ok: bool) -> bool:
    """int64 lengths or offsets on ref's device, [B] or, where per_head_ok, [B, Hkv]; True if [B, Hkv]."""
    check(t.dtype == torch.int64, name, " must be int64, got ", t.dtype)
    per_head = per_head_ok and t.dim() == 2
    check((t.dim() == 1 and t.shape[0] == B) or (per_head and t.shape[0] == B and t.shape[1] == Hkv), name,
          " must be [B] = [", B, "]", " or [B, Hkv]" if per_head_ok else "", ", got ", shape(t))
    check(t.is_contiguous(), name, " must be contiguous")
    same_device(t, ref, name, ref_name)
    return per_head


def holo_decode(q, k_slots, v_slots, ph, slot_lens, k_tail, v_tail, tail_lens, mode, tail_bias, tail_start) -> None:
    check(mode in ("full", "aligned"), 'mode must be "full" or "aligned", got "', mode, '"')
    float_tensor(q, "q")
    check(q.dim() == 3, "q must be [B, Hq, head_dim], got ", shape(q))
    B, Hq, D = q.shape
    check(D % 2 == 0, "q: head_dim must be even, got ", D)
    cache = {"k_slots": k_slots, "v_slots": v_slots, "k_tail": k_tail, "v_tail": v_tail}
    for name, t in cache.items():
        float_tensor(t, name)
        same_device(t, q, name, "q")
        check(t.dtype == q.dtype, name, " has dtype ", t.dtype, " but q has ", q.dtype)
        check(t.dim() == 4, name, " must be [B, Hkv, len, head_dim], got ", shape(t))
        check(t.shape[0] == B, name, ".size(0) = ", t.shape[0], " must equal the batch size of q, ", B)
        check(t.shape[3] == D, name, ".size(3) = ", t.shape[3], " must equal head_dim of q, ", D)
    Hkv = k_slots.shape[1]
    for name, t in cache.items():
        check(t.shape[1] == Hkv, name, " has ", t.shape[1], " KV heads but k_slots has ", Hkv)
    check(Hkv > 0 and Hq % Hkv == 0, "q has ", Hq, " heads, which is not a multiple of the ", Hkv,
          " KV heads of k_slots (GQA needs Hq % Hkv == 0)")
    check(v_slots.shape[2] == k_slots.shape[2], "v_slots holds ", v_slots.shape[2], " slots but k_slots holds ",
          k_slots.shape[2])
    check(v_tail.shape[2] == k_tail.shape[2], "v_tail holds ", v_tail.shape[2], " tokens but k_tail holds ",
          k_tail.shape[2])
    phase(ph, q, "q")
    lens(slot_lens, "slot_lens", q, "q", B, Hkv, False)
    lens(tail_lens, "tail_lens", q, "q", B, Hkv, True)
    if tail_start is not None:
        lens(tail_start, "tail_start", q, "q", B, Hkv, True)
        check(tail_start.shape == tail_lens.shape, "tail_start must have the shape of tail_lens, ",
              shape(tail_lens), ", got ", shape(tail_start))
    if tail_bias is not None:
        float_tensor(tail_bias, "tail_bias")
        same_device(tail_bias, k_tail, "tail_bias", "k_tail")
        check(tail_bias.dim() == 3 and tail_bias.shape == k_tail.shape[:3], "tail_bias must be [B, Hkv, T] = ",
              shape(k_tail)[:3], ", got ", shape(tail_bias))


def token_rows(t: torch.Tensor, name: str) -> None:
    """An append's new tokens [B, Hkv, head_dim]: any batch and head strides (a model's v is a slice of its fused
    projection's output), each token's row contiguous."""
    check(t.is_floating_point(), name, " must be a floating-point tensor, got ", t.dtype)
    check(t.dim() == 3, name, " must be [B, Hkv, head_dim] (one new token per sequence), got ", shape(t))
    check(t.stride(2) == 1 or t.shape[2] <= 1, name, " must have contiguous rows (stride 1 along head_dim), got "
          "strides ", list(t.stride()), " (call .contiguous() first)")


def new_tokens(k) -> tuple:
    """The new tokens k [B, Hkv, head_dim] of an append, one per sequence -> (B, Hkv, head_dim)."""
    token_rows(k, "k")
    return tuple(k.shape)


def like_tokens(k, v, cache: dict) -> None:
    """What goes with an append's k: v [B, Hkv, head_dim] and the cache's tensors [B, Hkv, len, head_dim], in k's
    dtype."""
    B, H, D = k.shape
    for name, t, rank in [("v", v, 3), *((n, c, 4) for n, c in cache.items())]:
        (token_rows if rank == 3 else float_tensor)(t, name)
        same_device(t, k, name, "k")
        check(t.dtype == k.dtype, name, " has dtype ", t.dtype, " but k has ", k.dtype)
        check(t.dim() == rank and t.shape[0] == B and t.shape[1] == H and t.shape[rank - 1] == D, name,
              " must be [B, Hkv, ", "len, " if rank == 4 else "", "head_dim] with B = ", B, ", Hkv = ", H,
              ", head_dim = ", D, " (from k), got ", shape(t))


def holo_append(k, v, ph, k_slots, v_slots, k_tail, v_tail, slot_lens, tail_lens, tail_start, sinks,
                exact_share, window_slots, evicted) -> None:
    B, H, D = new_tokens(k)
    like_tokens(k, v, {"k_slots": k_slots, "v_slots": v_slots, "k_tail": k_tail, "v_tail": v_tail})
    check(v_slots.shape[2] == k_slots.shape[2], "v_slots holds ", v_slots.shape[2], " slots but k_slots holds ",
          k_slots.shape[2])
    check(v_tail.shape[2] == k_tail.shape[2], "v_tail holds ", v_tail.shape[2], " rows but k_tail holds ",
          k_tail.shape[2])
    check(k_tail.shape[2] > 0, "k_tail must have room for at least one token")
    phase(ph, k, "k")
    for name, t in {"slot_lens": slot_lens, "tail_lens": tail_lens, "tail_start": tail_start}.items():
        lens(t, name, k, "k", B, H, False)
    check(sinks >= 0, "sinks must be >= 0, got ", sinks)
    check(0 <= exact_share <= 1, "exact_share must lie in [0, 1], got ", exact_share)
    check(window_slots >= 0, "window_slots must be >= 0 (0: no window), got ", window_slots)
    check(window_slots == 0 or evicted is not None, "evicted must be given when window_slots > 0 (it places the "
          "slot ring)")
    if evicted is not None:
        lens(evicted, "evicted", k, "k", B, H, False)


def append_entries(k, v, k_cache, v_cache, lens_, bias) -> bool:
    """True if lens are [B, H] (per head)."""
    B, H, D = new_tokens(k)
    like_tokens(k, v, {"k_cache": k_cache, "v_cache": v_cache})
    check(v_cache.shape[2] == k_cache.shape[2], "v_cache holds ", v_cache.shape[2], " entries but k_cache holds ",
          k_cache.shape[2])
    per_head = lens(lens_, "lens", k, "k", B, H, True)
    if bias is not None:
        float_tensor(bias, "bias")
        same_device(bias, k, "bias", "k")
        check(bias.dim() == 3 and bias.shape == k_cache.shape[:3], "bias must be [B, Hkv, len] = ",
              shape(k_cache)[:3], ", got ", shape(bias))
    return per_head


def fp32_batch(t: torch.Tensor, name: str, layout: str) -> None:
    check(t.dtype == torch.float32, name, " must be float32, got ", t.dtype)
    check(t.dim() == 3, name, " must be ", layout, ", got ", shape(t))
    check(t.is_contiguous(), name, " must be contiguous (call .contiguous() first)")


def batched_eigh(a: torch.Tensor) -> None:
    fp32_batch(a, "a", "[batch, n, n]")
    check(a.shape[1] == a.shape[2], "a must be [batch, n, n] (square), got ", shape(a))


def batched_cholesky_solve(a: torch.Tensor, b: torch.Tensor) -> None:
    batched_eigh(a)
    fp32_batch(b, "b", "[batch, n, k]")
    same_device(b, a, "b", "a")
    check(b.shape[0] == a.shape[0], "b.size(0) = ", b.shape[0], " must equal the batch of a, ", a.shape[0])
    check(b.shape[1] == a.shape[1], "b.size(1) = ", b.shape[1], " must equal n = a.size(1) = ", a.shape[1])
