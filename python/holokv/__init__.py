"""holokv: KV-cache compression ops for PyTorch (HoloKV superposition, SRC summarization).

Importing the package loads the compiled library, which registers ``torch.ops.holokv.*``
(CPU kernels always, CUDA kernels when built with CUDA), then the fake kernels and
autograd formulas that live in Python.
"""
import torch

from . import _C  # noqa: F401  registers torch.ops.holokv
from . import _build_info, autograd, fake  # noqa: F401
from .decode_linear import decode_linear
from .ops import (append_entries, batched_cholesky_solve, batched_eigh, holo_append, holo_decode, phase_keys,
                  superpose)

__all__ = ["append_entries", "batched_cholesky_solve", "batched_eigh", "build_info", "decode_linear", "holo_append",
           "holo_decode", "phase_keys", "superpose"]
__version__ = "0.1.0"


def build_info() -> dict:
    """How this copy of holokv was built, and whether CUDA kernels can run here."""
    return {
        "version": __version__,
        "cuda": _build_info.CUDA,
        "cuda_archs": _build_info.CUDA_ARCHS,
        "cuda_version": _build_info.CUDA_VERSION,
        "torch_built_against": _build_info.TORCH_VERSION,
        "torch_running": torch.__version__,
        "gpu_available": torch.cuda.is_available(),
    }
