"""Plain PyTorch twins of every ``torch.ops.holokv`` op.

They are written for clarity, not speed: the superposed cache is expanded back
into one demodulated entry per token and read by ordinary softmax attention.
Tests compare the CPU and CUDA kernels against them (in float64), and code that
needs autograd through superposition (LoRA distillation, superposed prefill)
uses them directly.
"""
from __future__ import annotations

import itertools
import math

import torch

ROPE_LAYOUTS = ("half", "interleaved")
MODES = ("aligned", "full")


def hadamard(k: int) -> torch.Tensor:
    """Sylvester Walsh-Hadamard matrix H_k (k a power of two); row 0 is all ones."""
    h = torch.ones(1, 1)
    while h.shape[0] < k:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def key_groups(head_dim: int, k: int, rope_layout: str) -> torch.Tensor:
    """Group index g(i) in [0, k) of each dimension i; keys are Phi_j[i] = H[j, g(i)].

    Dimensions that RoPE rotates together land in one group (Strict Even-Boundary
    Rule): i and i + d/2 for "half", 2i and 2i + 1 for "interleaved".
    """
    i = torch.arange(head_dim)
    pair = i % (head_dim // 2) if rope_layout == "half" else i // 2
    return pair % k


def phase_keys_ref(k: int, head_dim: int, rope_layout: str = "half") -> torch.Tensor:
    """[k, head_dim] float32 ±1 keys with Phi Phi^T = head_dim * I."""
    return hadamard(k)[:, key_groups(head_dim, k, rope_layout)]


def superpose_ref(x: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, d] -> slots [B, H, ceil(N/k), d]; slot_s = sum_t x[s*k+t] * Phi_t / sqrt(k)."""
    k = phase.shape[0]
    B, H, N, d = x.shape
    S = -(-N // k)
    pad = x.new_zeros(B, H, S * k - N, d)
    xs = torch.cat([x, pad], 2).view(B, H, S, k, d)
    return (xs * phase.to(x.dtype)).sum(3) / math.sqrt(k)


def demodulate_ref(slots: torch.Tensor, phase: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """slots [B, H, S, d] -> [B, H, n_tokens, d]: token s*k+j reads slot s under Phi_j."""
    k = phase.shape[0]
    B, H, S, d = slots.shape
    out = slots.unsqueeze(3) * phase.to(slots.dtype)  # [B, H, S, k, d]
    return out.reshape(B, H, S * k, d)[:, :, :n_tokens]


def holo_decode_ref(q, k_slots, v_slots, phase, slot_lens, k_tail, v_tail, tail_lens,
                    mode: str = "full", scale: float | None = None, slot_gain: float = 1.0, tail_bias=None,
                    tail_start=None):
    """Reference for ``torch.ops.holokv.holo_decode``; see its docstring for the semantics.

    Computed per sequence and KV head in the dtype of ``q`` (pass float64 for a reference).
    """
    B, Hq, d = q.shape
    Hkv = k_slots.shape[1]
    G = Hq // Hkv
    k, T = phase.shape[0], k_tail.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    dt = q.dtype
    phi = phase.to(dt)
    lens = tail_lens.view(B, -1).expand(B, Hkv)
    starts = (torch.zeros_like(tail_lens) if tail_start is None else tail_start).view(B, -1).expand(B, Hkv)
    out = torch.empty_like(q).view(B, Hkv, G, d)
    for b, h in itertools.product(range(B), range(Hkv)):
        n_sup, n_tail = int(slot_lens[b]), int(lens[b, h])
        n_slots = -(-n_sup // k)
        qh = q[b].view(Hkv, G, d)[h]
        ks, vs = k_slots[b, h, :n_slots].to(dt), v_slots[b, h, :n_slots].to(dt)
        # logits are gain * <q, k> as in the kernels (with scale = inf, the order decides NaN against inf)
        if mode == "aligned":
            j = (n_sup + n_tail - 1) % k
            s_sup = scale * slot_gain * ((qh * phi[j]) @ ks.T)
            v_sup = math.sqrt(k) * vs * phi[j]  # [S, d]
        elif mode == "full":
            kd = demodulate_ref(ks[None, None], phi, n_sup)[0, 0]  # [n_sup, d]
            s_sup = scale * slot_gain * (qh @ kd.T)
            v_sup = math.sqrt(k) * demodulate_ref(vs[None, None], phi, n_sup)[0, 0]
        else:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        rows = (int(starts[b, h]) + torch.arange(n_tail)) % max(T, 1)  # the tail is a ring from its start
        kt, vt = k_tail[b, h, rows].to(dt), v_tail[b, h, rows].to(dt)
        s_tail = scale * (qh @ kt.T)
        if tail_bias is not None:
            s_tail = s_tail + tail_bias[b, h, rows].to(dt)
        s = torch.cat([s_sup, s_tail], -1)
        masked = (s == -math.inf).all(-1, keepdim=True)  # nothing to attend to (or no entries): zeros
        p = torch.softmax(s.masked_fill(masked, 0.0), -1)  # a NaN or +inf logit gives a NaN row
        out[b, h] = (p @ torch.cat([v_sup, vt], 0)).masked_fill(masked, 0.0)
    return out.view(B, Hq, d)


def closed_tokens_ref(valid: int, sinks: int, k: int, exact_share: float) -> int:
    """HoloKV's closing rule for one sequence (``HoloSpec.rule``): tokens superposed once ``valid`` are held."""
    s = min(valid, sinks)
    exact = max(s, math.floor(valid * exact_share))
    return min((valid - s) // k * k, -(-(valid - exact) // k) * k)


def append_entries_ref(k, v, k_cache, v_cache, lens, bias=None) -> None:
    """Reference for ``torch.ops.holokv.append_entries`` (in place, same semantics; see its docstring)."""
    B, H = k.shape[:2]
    at = lens.view(B, -1).expand(B, H)
    for b in range(B):
        for h in range(H):
            i = int(at[b, h])
            if not 0 <= i < k_cache.shape[2]:
                raise RuntimeError(f"append_entries: lens {i} must lie in [0, {k_cache.shape[2]})")
            k_cache[b, h, i], v_cache[b, h, i] = k[b, h], v[b, h]
            if bias is not None:
                bias[b, h, i] = 0
    lens.add_(1)


def holo_append_ref(k, v, phase, k_slots, v_slots, k_tail, v_tail, slot_lens, tail_lens, tail_start, sinks: int,
                    exact_share: float, window_slots: int = 0, evicted=None) -> None:
    """Reference for ``torch.ops.holokv.holo_append`` (in place, same semantics; see its docstring)."""
    kk, T, W = phase.shape[0], k_tail.shape[2], window_slots
    for b in range(k.shape[0]):
        sl, tl, start = int(slot_lens[b]), int(tail_lens[b]), int(tail_start[b])
        ev = int(evicted[b]) if W else 0
        close = closed_tokens_ref(sl + tl, sinks, kk, exact_share) - sl
        n_sinks = min(sl + tl, sinks)
        row = lambda i: (start + i) % T  # noqa: E731
        # slot j closing now: the next row, or in a window's ring the row of its stream block mod W
        slot_rows = [((sl + ev) // kk + j) % W if W else sl // kk + j for j in range(close // kk)]
        for x, slots, tail in ((k, k_slots, k_tail), (v, v_slots, v_tail)):
            block = tail[b][:, [row(n_sinks + i) for i in range(close)]]  # [H, close, d]
            acc = torch.float64 if block.dtype == torch.float64 else torch.float32  # superpose accumulates so
            new = superpose_ref(block[None].to(acc), phase.to(acc))[0].to(slots.dtype)
            for j, r in enumerate(slot_rows):  # in order: on a ring a later slot replaces an earlier one
                slots[b, :, r] = new[:, j]
            tail[b][:, [row(close + i) for i in range(n_sinks)]] = tail[b][:, [row(i) for i in range(n_sinks)]]
            tail[b, :, row(tl)] = x[b]
        held = min(sl + close, W * kk) if W else sl + close
        if W:
            evicted[b] = ev + sl + close - held
        tail_start[b], tail_lens[b], slot_lens[b] = row(close), tl + 1 - close, held
