import pytest
import torch

import holokv  # noqa: F401  registers the ops

CUDA = torch.cuda.is_available() and holokv.build_info()["cuda"]
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and a CUDA build of holokv")


def dtype_id(dtype: torch.dtype) -> str:
    """Readable test ids (``bfloat16``), so that ``-k bfloat16`` selects a dtype."""
    return str(dtype).removeprefix("torch.")
