import pytest
import torch

import holokv  # noqa: F401  registers the ops

CUDA = torch.cuda.is_available() and holokv.build_info()["cuda"]
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and a CUDA build of holokv")


def lens_tensor(values, device):
    return torch.tensor(values, dtype=torch.int64, device=device)
