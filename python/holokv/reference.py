"""Plain PyTorch twins of every ``torch.ops.holokv`` op.

They are written for clarity, not speed: the superposed cache is expanded back
into one demodulated entry per token and read by ordinary softmax attention.
Tests compare the CPU and CUDA kernels against them (in float64), and code that
needs autograd through superposition (LoRA distillation, superposed prefill)
uses them directly.
"""
from __future__ import annotations

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


def superpose_ref(x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, d] -> slots [B, H, ceil(N/k), d]; slot_s = sum_t x[s*k+t] * Phi_t / sqrt(k)."""
    k = keys.shape[0]
    B, H, N, d = x.shape
    S = -(-N // k)
    pad = x.new_zeros(B, H, S * k - N, d)
    xs = torch.cat([x, pad], 2).view(B, H, S, k, d)
    return (xs * keys.to(x.dtype)).sum(3) / math.sqrt(k)


def demodulate_ref(slots: torch.Tensor, keys: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """slots [B, H, S, d] -> [B, H, n_tokens, d]: token s*k+j reads slot s under Phi_j."""
    k = keys.shape[0]
    B, H, S, d = slots.shape
    out = slots.unsqueeze(3) * keys.to(slots.dtype)  # [B, H, S, k, d]
    return out.reshape(B, H, S * k, d)[:, :, :n_tokens]


def holo_decode_ref(q, k_slots, v_slots, keys, slot_lens, k_tail, v_tail, tail_lens,
                    mode: str = "full", scale: float | None = None, slot_gain: float = 1.0, tail_bias=None):
    """Reference for ``torch.ops.holokv.holo_decode``; see its docstring for the semantics.

    Computed per sequence in the dtype of ``q`` (pass float64 for a reference).
    """
    B, Hq, d = q.shape
    Hkv = k_slots.shape[1]
    G = Hq // Hkv
    k = keys.shape[0]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    dt = q.dtype
    out = torch.empty_like(q)
    for b in range(B):
        n_sup, n_tail = int(slot_lens[b]), int(tail_lens[b])
        n_slots = -(-n_sup // k)
        qb = q[b].view(Hkv, G, d)
        ks, vs = k_slots[b, :, :n_slots].to(dt), v_slots[b, :, :n_slots].to(dt)
        phi = keys.to(dt)
        if mode == "aligned":
            j = (n_sup + n_tail - 1) % k
            s_sup = scale * slot_gain * torch.einsum("hgd,hsd->hgs", qb * phi[j], ks)
            v_sup = math.sqrt(k) * vs * phi[j]  # [Hkv, S, d]
        elif mode == "full":
            kd = demodulate_ref(ks.unsqueeze(0), phi, n_sup)[0]  # [Hkv, n_sup, d]
            s_sup = scale * slot_gain * torch.einsum("hgd,hnd->hgn", qb, kd)
            v_sup = math.sqrt(k) * demodulate_ref(vs.unsqueeze(0), phi, n_sup)[0]
        else:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        kt, vt = k_tail[b, :, :n_tail].to(dt), v_tail[b, :, :n_tail].to(dt)
        s_tail = scale * torch.einsum("hgd,htd->hgt", qb, kt)
        if tail_bias is not None:
            s_tail = s_tail + tail_bias[b, :, None, :n_tail].to(dt)
        p = torch.softmax(torch.cat([s_sup, s_tail], -1), -1)
        vall = torch.cat([v_sup, vt], 1)  # [Hkv, n, d]
        out[b] = torch.einsum("hgn,hnd->hgd", p, vall).reshape(Hq, d)
    return out
