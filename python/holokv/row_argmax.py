"""``row_argmax(logits)``: ``logits.argmax(-1)`` of a decode step's [B, V] logits in two Triton passes.

``argmax`` reduces each row in one block, slow for a 128K vocabulary, and a reduction over chunks of each row in
ATen ops takes five launches (max, argmax, gather and the index arithmetic), each longer than the work. Here the
first pass splits each row over programs of ``BLOCK`` logits, each leaving its first maximum, or its first NaN,
which argmax counts as the largest; the second picks each row's first NaN, else its first maximum, among them.
Ties go to the first index, as with argmax. CPU tensors, other dtypes or a build without Triton take the ATen reduction.
"""
from __future__ import annotations

import torch
from torch.utils._triton import has_triton

BLOCK = 2048  # logits a first-pass program reads: 63 programs a row for a 128K vocabulary
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

if has_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _first_best(x, at, inside, NONE):
        """(value, index) of x's first NaN (value NaN), else of its first maximum; ``at``: x's indices,
        ``NONE``: an index past them all."""
        nan = (x != x) & inside
        first_nan = tl.min(tl.where(nan, at, NONE))
        top = tl.max(tl.where(nan, -float("inf"), x))
        first_top = tl.min(tl.where((x == top) & inside, at, NONE))
        return tl.where(first_nan < NONE, float("nan"), top), tl.where(first_nan < NONE, first_nan, first_top)

    @triton.jit
    def _chunk_best(logits, best, where, V, stride, BLOCK: tl.constexpr):
        """Each chunk's _first_best, its index in the row."""
        row, chunk = tl.program_id(0), tl.program_id(1)
        i = chunk * BLOCK + tl.arange(0, BLOCK)
        inside = i < V
        x = tl.load(logits + row.to(tl.int64) * stride + i, mask=inside, other=-float("inf")).to(tl.float32)
        value, at = _first_best(x, i, inside, V)
        out = row * tl.num_programs(1) + chunk
        tl.store(best + out, value)
        tl.store(where + out, at.to(tl.int64))

    @triton.jit
    def _row_best(best, where, out, chunks, CHUNKS: tl.constexpr):
        """Each row's _first_best among its chunks' (NaN comes first, then the first chunk's index)."""
        row = tl.program_id(0)
        c = tl.arange(0, CHUNKS)
        inside = c < chunks
        x = tl.load(best + row * chunks + c, mask=inside, other=-float("inf"))
        at = tl.load(where + row * chunks + c, mask=inside, other=0)
        _, index = _first_best(x, at, inside, 2**62)
        tl.store(out + row, index)


def takes(logits: torch.Tensor) -> bool:
    """Whether the Triton passes serve ``logits``: CUDA, [B, V] with V > 0, 16- or 32-bit floats, unit stride."""
    return (has_triton() and logits.is_cuda and logits.dim() == 2 and logits.shape[1] > 0
            and logits.dtype in DTYPES and logits.stride(1) == 1)


def row_argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` of [B, V] logits -> [B] int64."""
    if not takes(logits):
        return logits.argmax(-1)
    B, V = logits.shape
    chunks = triton.cdiv(V, BLOCK)
    best = torch.empty(B, chunks, dtype=torch.float32, device=logits.device)
    where = torch.empty(B, chunks, dtype=torch.int64, device=logits.device)
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B:
        with torch.cuda.device(logits.device):
            _chunk_best[(B, chunks)](logits, best, where, V, logits.stride(0), BLOCK=BLOCK, num_warps=4)
            _row_best[(B,)](best, where, out, chunks, CHUNKS=triton.next_power_of_2(chunks), num_warps=2)
    return out
