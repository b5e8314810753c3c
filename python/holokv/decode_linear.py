"""``torch.ops.holokv.decode_linear``: a decode step's few rows x [M <= 16, K] times an ``nn.Linear`` weight [N, K].

At decode batch sizes a linear layer is bound by its weight's bytes. cuBLAS reads the smaller ones well short of
the bandwidth: a fixed ramp and a split-K reduction that a 34 MB weight does not amortize (Llama-3-8B's o
projection at 1.6-1.7x its bytes' floor on an H200, q/k/v at 1.4-1.5x, down at 1.2x; ``holokv bench linear``).
Here each program owns 32 output features and streams their rows in 256-wide K tiles through a deep software
pipeline, the rows of x padded to one 16-row tensor-core tile; one launch, no split-K, fp32 accumulation.

A Triton kernel (``torch.library.triton_op``, so ``torch.compile`` traces into it); CPU tensors, other dtypes,
more rows, a bias or a build without Triton take ``F.linear``, which is also its reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.library import triton_op, wrap_triton
from torch.utils._triton import has_triton

ROWS = 16  # the most rows of x: one tensor-core tile
HALF = (torch.float16, torch.bfloat16)
BLOCK_N, BLOCK_K, WARPS, STAGES = 32, 256, 4, 5  # the best for o and down in a sweep of tile shapes on an H200

if has_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _decode_linear_kernel(x_ptr, w_ptr, y_ptr, M, N, K, BN: tl.constexpr, BK: tl.constexpr,
                              EVEN: tl.constexpr):
        n = tl.program_id(0) * BN + tl.arange(0, BN)
        m = tl.arange(0, 16)
        acc = tl.zeros((16, BN), tl.float32)
        for k0 in range(0, K, BK):
            k = k0 + tl.arange(0, BK)
            if EVEN:  # N and K whole tiles: no masks in the stream
                w = tl.load(w_ptr + n[:, None] * K + k[None, :])
            else:
                w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=(n[:, None] < N) & (k[None, :] < K), other=0.0)
            x = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
            acc += tl.dot(x, tl.trans(w))
        tl.store(y_ptr + m[:, None] * N + n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(m[:, None] < M) & (n[None, :] < N))


def takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether the kernel serves ``F.linear(x, weight, bias)``: CUDA, one device, 16-bit, at most 16 rows, K > 0,
    contiguous, no bias."""
    return (has_triton() and bias is None and x.is_cuda and weight.device == x.device and x.dtype in HALF
            and weight.dtype == x.dtype and x.shape[-1] > 0 and x.numel() // x.shape[-1] <= ROWS
            and x.is_contiguous() and weight.is_contiguous())


@triton_op("holokv::decode_linear", mutates_args=())
def decode_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for x [..., K] and weight [N, K] -> [..., N]."""
    if x.shape[-1] != weight.shape[-1] or weight.dim() != 2:
        raise ValueError(f"x [..., K] and weight [N, K] must share K, got {tuple(x.shape)} and {tuple(weight.shape)}")
    if not takes(x, weight):
        return F.linear(x, weight)
    N, K = weight.shape
    M = x.numel() // K
    y = x.new_empty(*x.shape[:-1], N)
    if M and N:
        wrap_triton(_decode_linear_kernel)[(triton.cdiv(N, BLOCK_N),)](
            x, weight, y, M, N, K, BN=BLOCK_N, BK=BLOCK_K, EVEN=N % BLOCK_N == 0 and K % BLOCK_K == 0,
            num_warps=WARPS, num_stages=STAGES)
    return y


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear``, by :func:`decode_linear` where it serves."""
    return torch.ops.holokv.decode_linear(x, weight) if takes(x, weight, bias) else F.linear(x, weight, bias)
