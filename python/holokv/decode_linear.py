"""``torch.ops.holokv.decode_linear``: a decode step's few rows x [M <= 16, K] times an ``nn.Linear`` weight [N, K].

At decode batch sizes a linear layer is bound by its weight's bytes. cuBLAS reads the smaller ones well short of
the bandwidth: a fixed ramp and a split-K reduction that a 34 MB weight does not amortize (Llama-3-8B's o
projection at 1.6-1.7x its bytes' floor on an H200, q/k/v at 1.4-1.5x, down at 1.2x; ``holokv bench linear``).
Here each program owns 32 output features and streams their rows in 256-wide K tiles through a deep software
pipeline, the rows of x padded to one 16-row tensor-core tile; one launch, no split-K, fp32 accumulation.

On Hopper it launches with programmatic dependent launch (``HOLOKV_PDL=0`` turns that off): its programs take the
SMs the kernel before it leaves, and each loads its first weight tile, which no kernel writes, before it waits for
that kernel's output. A custom op (opaque to ``torch.compile``, whose wrapping of user Triton kernels passes no
launch options but warps and stages); CPU tensors, other dtypes, more rows, a bias or a build without Triton take
``F.linear``, which is also its reference.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.utils._triton import has_triton

ROWS = 16  # the most rows of x: one tensor-core tile
HALF = (torch.float16, torch.bfloat16)
BLOCK_N, BLOCK_K, WARPS, STAGES = 32, 256, 4, 5  # the best for o and down in a sweep of tile shapes on an H200

if has_triton():
    import triton
    import triton.language as tl

    PDL_OPS = hasattr(tl.extra.cuda, "gdc_wait")  # griddepcontrol in this Triton

    @triton.jit
    def _tile(ptr, rows, cols, R, C, EVEN: tl.constexpr):
        if EVEN:  # whole tiles: no masks in the stream
            return tl.load(ptr + rows[:, None] * C + cols[None, :])
        return tl.load(ptr + rows[:, None] * C + cols[None, :], mask=(rows[:, None] < R) & (cols[None, :] < C),
                       other=0.0)

    @triton.jit
    def _decode_linear_kernel(x_ptr, w_ptr, y_ptr, M, N, K, BN: tl.constexpr, BK: tl.constexpr,
                              EVEN: tl.constexpr, PDL: tl.constexpr):
        n = tl.program_id(0) * BN + tl.arange(0, BN)
        m = tl.arange(0, 16)
        k = tl.arange(0, BK)
        w = _tile(w_ptr, n, k, N, K, EVEN)  # the first weight tile, before the wait
        if PDL:
            tl.extra.cuda.gdc_wait()  # x (and y's memory) belong to the kernels before until they are done
            tl.extra.cuda.gdc_launch_dependents()
        acc = tl.dot(_tile(x_ptr, m, k, M, K, False), tl.trans(w))
        for k0 in range(BK, K, BK):
            k = k0 + tl.arange(0, BK)
            acc += tl.dot(_tile(x_ptr, m, k, M, K, False), tl.trans(_tile(w_ptr, n, k, N, K, EVEN)))
        tl.store(y_ptr + m[:, None] * N + n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(m[:, None] < M) & (n[None, :] < N))


def pdl(device: torch.device) -> bool:
    """Whether decode_linear launches with programmatic dependent launch on ``device``."""
    return (has_triton() and PDL_OPS and os.environ.get("HOLOKV_PDL") != "0"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether the kernel serves ``F.linear(x, weight, bias)``: CUDA, one device, 16-bit, at most 16 rows, K > 0,
    contiguous, no bias."""
    return (has_triton() and bias is None and x.is_cuda and weight.device == x.device and x.dtype in HALF
            and weight.dtype == x.dtype and x.shape[-1] > 0 and x.numel() // x.shape[-1] <= ROWS
            and x.is_contiguous() and weight.is_contiguous())


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.shape[-1] != weight.shape[-1] or weight.dim() != 2:
        raise ValueError(f"x [..., K] and weight [N, K] must share K, got {tuple(x.shape)} and {tuple(weight.shape)}")


@torch.library.custom_op("holokv::decode_linear", mutates_args=())
def decode_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for x [..., K] and weight [N, K] -> [..., N]."""
    _check(x, weight)
    if not takes(x, weight):
        return F.linear(x, weight)
    N, K = weight.shape
    M = x.numel() // K
    y = x.new_empty(*x.shape[:-1], N)
    if M and N:
        with torch.cuda.device(x.device):
            use_pdl = pdl(x.device)
            _decode_linear_kernel[(triton.cdiv(N, BLOCK_N),)](
                x, weight, y, M, N, K, BN=BLOCK_N, BK=BLOCK_K, EVEN=N % BLOCK_N == 0 and K % BLOCK_K == 0,
                PDL=use_pdl, num_warps=WARPS, num_stages=STAGES, **({"launch_pdl": True} if use_pdl else {}))
    return y


@decode_linear.register_fake
def _(x, weight):
    _check(x, weight)
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear``, by :func:`decode_linear` where it serves."""
    return torch.ops.holokv.decode_linear(x, weight) if takes(x, weight, bias) else F.linear(x, weight, bias)
