"""Training attention through a HoloKV cache: each prompt position reads what the cache serves it at decode.

The keys and values are the prompt's exact tokens followed by one virtual entry per stream token, its
closed slot demodulated under its phase (:func:`~holokv.caches.superposed.virtual_kv`); which entries a
query reads is HoloSpec's rule as a mask_mod (:func:`~holokv.caches.superposed.prefill_mask`). So this
is ordinary softmax attention under a block-sparse mask, which FlexAttention runs fused, fwd and bwd:
exact keys form a band (sinks, the open slot and the recent share), virtual keys a causal staircase.
The dense reference over the same entries and mask is
:func:`~holokv.caches.superposed.superposed_attention`.
"""
from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from .superposed import HoloSpec, prefill_mask, superposed_attention, virtual_kv

# FlexAttention is only fused when compiled; the compiled block mask never materializes the [B, N, 2N] mask.
_compiled = (torch.compile(create_block_mask), torch.compile(flex_attention))


def holo_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phase: torch.Tensor, spec: HoloSpec,
                           pads: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Causal attention of every prompt position over its superposed past, differentiable.

    q ``[B, Hq, N, d]``, k/v ``[B, Hkv, N, d]`` after RoPE (Hq a multiple of Hkv); phase ``[spec.k, d]``
    (:func:`holokv.phase_keys` for the model's RoPE layout); pads int64 ``[B]``, left pads per sequence
    (default none; a pad query reads only itself); scale defaults to 1/sqrt(d). Returns ``[B, N, Hq, d]``.

    Row i equals ``holo_decode`` (mode ``spec.mode``, ``spec.slot_gain``) reading a cache of ``spec``
    that holds the sequence's tokens up to i: closed slots plus the sinks, the open slot and the recent
    exact share. On CUDA: compiled FlexAttention (the first call per spec and dtype compiles; a second N
    compiles once more, with N dynamic). Elsewhere the dense reference, since FlexAttention has no CPU
    backward; it holds B·Hq·N·2N fp32 scores. In "aligned" mode the virtual entries of the other k-1
    phases are masked inside the blocks FlexAttention visits, so it costs what "full" mode does.
    """
    pads = _checked(q, k, v, phase, spec, pads)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.is_cuda:
        return flex_prefill_attention(q, k, v, phase, spec, pads, scale)
    return superposed_attention(spec, phase, q, k, v, pads, scale)


def flex_prefill_attention(q, k, v, phase, spec: HoloSpec, pads: torch.Tensor, scale: float, compiled: bool = True):
    """The FlexAttention path of :func:`holo_prefill_attention`, for arguments it checked. ``compiled=False``
    runs it eagerly (unfused, forward only on CPU): the tests check the mask and the entries that way on CPU."""
    n = q.shape[2]
    block_mask, attend = _compiled if compiled else (create_block_mask, flex_attention)
    keys, values = virtual_kv(spec, phase.to(k), k, v, pads)
    mask = block_mask(prefill_mask(spec, pads, n), q.shape[0], None, n, 2 * n, device=q.device)
    return attend(q, keys, values, block_mask=mask, scale=scale, enable_gqa=True).transpose(1, 2)


def _checked(q, k, v, phase, spec, pads) -> torch.Tensor:
    """The left pads (zeros when None), after checking every argument's type, shape, dtype and device."""
    if not isinstance(spec, HoloSpec):
        raise TypeError(f"spec must be a HoloSpec, got {type(spec).__name__}")
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"q must be [B, Hq, N, d] and k, v [B, Hkv, N, d], got q {list(q.shape)}, "
                         f"k {list(k.shape)}, v {list(v.shape)}")
    B, Hq, n, d = q.shape
    if k.shape[0] != B or k.shape[2:] != (n, d) or Hq % k.shape[1]:
        raise ValueError(f"k, v must be [B, Hkv, N, d] = [{B}, Hkv, {n}, {d}] with Hkv dividing Hq = {Hq}, "
                         f"got {list(k.shape)}")
    if not (q.dtype == k.dtype == v.dtype and q.is_floating_point()):
        raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if phase.shape != (spec.k, d):
        raise ValueError(f"phase must be [spec.k, head_dim] = [{spec.k}, {d}], got {list(phase.shape)}")
    if pads is None:
        return torch.zeros(B, dtype=torch.long, device=q.device)
    if pads.shape != (B,) or pads.dtype != torch.long or pads.device != q.device:
        raise ValueError(f"pads must be int64 [B] = [{B}] on {q.device}, got {pads.dtype} {list(pads.shape)} "
                         f"on {pads.device}")
    return pads
