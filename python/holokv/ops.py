"""Documented Python entry points of the ``torch.ops.holokv`` ops (shapes, defaults).

Data flows K,V -> :func:`superpose` (phase keys from :func:`phase_keys`) ->
superposed cache -> :func:`holo_decode`. Each op has a plain PyTorch twin in
:mod:`holokv.reference` that the tests compare the CPU and CUDA kernels against.
SRC compression's batched linear algebra (:func:`batched_eigh`,
:func:`batched_cholesky_solve`) is compared against float64 ``torch.linalg``.
"""
from __future__ import annotations

import torch

ops = torch.ops.holokv


def phase_keys(k: int, head_dim: int, rope_layout: str = "half", *, device=None, dtype=torch.float32) -> torch.Tensor:
    """±1 Walsh-Hadamard phase keys ``[k, head_dim]``, deterministic, ``Phi @ Phi.T == head_dim * I``.

    ``Phi_j[i] = H_k[j, g(i)]`` with ``H_k`` the Sylvester Hadamard matrix (row 0 all
    ones) and ``g(i)`` the index of i's RoPE pair modulo k. Strict Even-Boundary
    Rule: dimensions RoPE rotates together share a sign, so RoPE commutes with
    ``x * Phi_j``. ``rope_layout="half"`` pairs i and i + d/2 (Hugging Face
    ``rotate_half``: Llama, Qwen, Mistral); ``"interleaved"`` pairs 2i and 2i+1
    (GPT-J, original Meta). k in {1, 2, 4, 8, 16}; head_dim a multiple of 2k.
    Built on the host, then moved to ``device``/``dtype``.
    """
    return ops.phase_keys(k, head_dim, rope_layout).to(device=device, dtype=dtype)


def superpose(x: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """Superpose k consecutive tokens per slot: ``[B, H, N, d] -> [B, H, ceil(N/k), d]``.

    ``slot_s = sum_t x[s*k + t] * Phi_t / sqrt(k)`` (the sqrt(k) variance
    normalization), accumulated in fp32 (fp64 for fp64 input), stored in x's
    dtype. A last partial slot sums only the tokens present. ``phase`` is
    ``[k, d]`` from :func:`phase_keys`. Differentiable (its adjoint demodulates).
    """
    return ops.superpose(x, phase)


def holo_decode(q, k_slots, v_slots, phase, slot_lens, k_tail, v_tail, tail_lens, mode: str = "full",
                scale: float | None = None, slot_gain: float = 1.0, tail_bias: torch.Tensor | None = None,
                tail_start: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step of attention over a superposed cache plus an exact tail.

    Shapes: q ``[B, Hq, d]`` (one new token per sequence); k_slots, v_slots
    ``[B, Hkv, S, d]``; k_tail, v_tail ``[B, Hkv, T, d]``; phase ``[k, d]`` (the
    phase keys of :func:`phase_keys`); slot_lens int64 ``[B]``; tail_lens int64
    ``[B]``, or ``[B, Hkv]`` where each KV head holds its own number of exact
    entries. Hq must be a multiple of Hkv (GQA).
    Returns ``[B, Hq, d]`` in q's dtype; softmax and sums run in fp32.

    ``slot_lens[b]`` counts the *tokens* held superposed by sequence b (its last
    slot may be partial); ``tail_lens[b]`` counts its valid exact tail tokens (the
    open slot, recent tokens, sinks; their order does not matter). The query's
    own K/V is the last cache entry, so its position is
    ``slot_lens + tail_lens - 1``.

    Scores: an exact token gets ``scale * <q, k>``; a superposed read gets
    ``scale * slot_gain * <q * Phi_j, k_slot>``. ``scale`` defaults to 1/sqrt(d).
    ``slot_gain=1`` is the paper's variance normalization (the slot already
    carries 1/sqrt(k)); ``slot_gain=sqrt(k)`` makes a target token's logit
    unbiased, since ``<q * Phi_j, slot> = (<q, k_j> + cross-talk) / sqrt(k)``.

    ``mode="aligned"`` (the seed simulator): every slot is read under the phase
    of the query's own position mod k, one score per slot, and its value is
    demodulated with that key and scaled by sqrt(k). ``mode="full"``: every slot
    is read under all k keys, one score per original token (phases past
    slot_lens in a partial last slot are masked), and
    ``out = sqrt(k) * sum p(s,j) Phi_j * v_slot_s + sum p_t v_t``.

    ``tail_bias`` (optional, ``[B, Hkv, T]``) is added to the exact tokens' logits:
    an SRC centroid carrying log-mass ``log m`` weighs as m copies of itself. With
    no superposed tokens this is the decode over an SRC-compacted cache (one
    decode core, two cache formats).

    ``tail_start`` (optional, int64, shaped like ``tail_lens``) makes each tail a
    ring: its entry t lives in row ``(tail_start + t) mod T``, so a cache can drop
    its oldest exact tokens by moving the start instead of moving the others.

    Non-finite input, the same on CPU, on CUDA and in the reference (README, "NaN and
    masking conventions"): a NaN logit (NaN in q, a used key, scale, slot_gain or
    tail_bias) or a +inf logit makes that query row NaN. An entry whose logit is -inf
    is masked (weight 0); a row whose every entry is masked, or that has no entries,
    is zeros. Values are weighted as in ``p @ v``: NaN in a used value gives NaN even
    at weight 0 (except in an all-masked row, which reads no value). Capacity past the
    lengths is never read. ``phase`` must be finite (a ±1 table from :func:`phase_keys`).
    Lengths outside the tensors' capacity raise on CPU; on CUDA (where checking
    them would need a host sync) that sequence's output is NaN.

    Not differentiable: with grad mode on, an input that requires grad raises (the
    differentiable twin is :func:`holokv.reference.holo_decode_ref`).
    """
    return ops.holo_decode(q, k_slots, v_slots, phase, slot_lens, k_tail, v_tail, tail_lens, mode, scale,
                           slot_gain, tail_bias, tail_start)


def holo_append(k, v, phase, k_slots, v_slots, k_tail, v_tail, slot_lens, tail_lens, tail_start, sinks: int,
                exact_share: float, window_slots: int = 0, evicted=None) -> None:
    """Append one new token per sequence to a HoloKV cache, in place (HoloKV's active accumulation buffer).

    k, v ``[B, Hkv, d]`` (any batch and head strides, rows contiguous: a view into a projection's output is read
    in place); the cache is what :func:`holo_decode` reads: slots ``[B, Hkv, S, d]``, a tail
    ring ``[B, Hkv, T, d]`` holding each sequence's ``[sinks | exact stream tokens]`` from
    ``tail_start``, and int64 ``[B]`` counters slot_lens (superposed tokens, a multiple of k),
    tail_lens, tail_start, all mutated. Per sequence, with ``valid = slot_lens + tail_lens`` tokens
    held before the new one: the slots that are due once ``valid`` tokens were read (the first
    ``sinks`` stay exact; a slot closes, whole, once the exact tokens exceed ``exact_share`` of
    ``valid``; :class:`holokv.caches.superposed.HoloSpec`) are summed from the ring's oldest stream
    tokens, ``sum_t x_t * Phi_t / sqrt(k)`` in fp32 as :func:`superpose` does, and written once; the
    sinks move past the closed rows and the ring's start advances; then the new token goes to the
    end of the ring. One launch, no host sync; the decode that follows reads the new token exact.

    Block-level eviction (the seed's streaming mode): with ``window_slots = W > 0`` a sequence holds at
    most W slots, a ring in which stream block g (counted from the first slot ever closed) lives in row
    ``g mod W``; a slot that closes on a full ring replaces the oldest. ``evicted`` (int64 ``[B]``,
    required then, mutated) counts the superposed tokens dropped, so ``slot_lens`` stays the tokens the
    slots hold (at most W·k) and :func:`holo_decode` reads the window unchanged (slot order does not
    matter to it, and whole slots leave, so the aligned phase is kept). The rule counts the tokens held
    (``valid = slot_lens + tail_lens``): the exact share is a share of what the cache covers, and memory
    stays bounded, sinks plus about ``exact_share`` of the covered span plus W slots. The default
    ``window_slots = 0`` keeps every slot (``evicted`` is then not used).

    Capacity: on CPU a sequence that needs more slots or tail rows than the tensors hold, or whose
    counters no appends could reach (slot_lens or evicted not whole slots, past the window, evicted
    before the window is full), raises; on CUDA (where checking would sync) it is left unchanged with
    ``tail_lens = T + 1``, and :func:`holo_decode` then gives NaN for it. Not differentiable: with grad
    mode on, an input that requires grad raises.
    """
    ops.holo_append(k, v, phase, k_slots, v_slots, k_tail, v_tail, slot_lens, tail_lens, tail_start, sinks,
                    exact_share, window_slots, evicted)


def append_entries(k, v, k_cache, v_cache, lens, bias=None) -> None:
    """Append one new entry per sequence to the entries :func:`holo_decode` reads as its tail, in place.

    k, v ``[B, Hkv, d]`` (any batch and head strides, rows contiguous) go to row ``lens[b]`` (int64 ``[B]``) or,
    for per-head lengths, ``lens[b, h]`` (``[B, Hkv]``) of k_cache, v_cache ``[B, Hkv, cap, d]`` (same dtype);
    ``bias`` ``[B, Hkv, cap]`` (a log-mass per entry, any float dtype), where given, gets 0 there; then the
    lengths grow by one. The cache of the exact and eviction methods and SRC's compacted cache append this way
    (for a HoloKV ring: :func:`holo_append`). One launch, no host sync.

    Capacity: on CPU a length outside ``[0, cap)`` raises before anything is written; on CUDA (where
    checking would sync) that sequence or head writes nothing and its length becomes ``cap + 1``, which
    :func:`holo_decode` turns into NaN. Not differentiable.
    """
    ops.append_entries(k, v, k_cache, v_cache, lens, bias)


def batched_eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigendecomposition of a batch of symmetric matrices, without host synchronization.

    a ``[batch, n, n]`` float32, contiguous; only its upper triangle (``a[:, i, j]``,
    i <= j) is read. Returns w ``[batch, n]`` ascending, v ``[batch, n, n]`` with the
    eigenvectors in columns (``a = v diag(w) vᵀ``, column-major strides like
    ``torch.linalg.eigh``) and info ``[batch]`` int32, 0 = ok. info[i] = -1: the upper
    triangle of a[i] holds a NaN or an inf, and w[i], v[i] are NaN (on both devices,
    without a host sync); info[i] > 0: the solver did not converge on a[i], and w[i],
    v[i] are unspecified (NaN on CPU). Failures are reported, never raised: check info
    off the hot path. Rank-deficient input is fine (zero eigenvalues, finite orthonormal v).

    CUDA: cuSOLVER's batched Jacobi solver (syevjBatched) for n <= 32, which it is
    limited to, and the batched 64-bit syevBatched above (one call per chunk of the
    batch, where ``torch.linalg.eigh`` loops over matrices). CPU: LAPACK through
    ``torch.linalg.eigh``.
    """
    return ops.batched_eigh(a)


def batched_cholesky_solve(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``a x = b`` for a batch of symmetric positive definite a, without host synchronization.

    a ``[batch, n, n]``, b ``[batch, n, k]``, float32, contiguous, same device; only the
    upper triangle of a is read. Returns x ``[batch, n, k]`` (column-major strides) and
    info ``[batch]`` int32: 0 = ok, j > 0 = the leading minor of order j of a[i] is not
    positive definite (a singular a, e.g. zero or with duplicate rows, usually lands
    here), and then x[i] = 0. A nearly singular a that still factors gives a finite but
    large x: regularize (see :func:`holokv.compaction.linalg.ridge_solve`).

    CUDA: cuSOLVER's batched Cholesky (potrfBatched), then two cuBLAS batched
    triangular solves over all k columns (potrsBatched takes one right-hand side).
    CPU: LAPACK through ``torch.linalg.cholesky_ex`` and ``torch.cholesky_solve``.
    """
    return ops.batched_cholesky_solve(a, b)
