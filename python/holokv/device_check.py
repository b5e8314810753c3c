"""The ``--device`` check the command-line tools share (before any model work)."""
from __future__ import annotations

import torch


def check_device(name: str) -> None:
    """Raise ValueError, naming ``--device``, unless ``name`` is a device this machine has."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a torch device: {e}") from e
    if device.type == "cuda":  # device_count() is 0 without a GPU, a driver or a CUDA build of torch
        count = torch.cuda.device_count()
        if (device.index or 0) >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA GPU(s)")
        return
    try:
        torch.empty(0, device=device)
    except RuntimeError as e:
        raise ValueError(f"--device {name} is not available here: {e}") from e
