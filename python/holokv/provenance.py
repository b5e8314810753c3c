"""What a measurement ran on: commit, torch, the holokv build and the device (benchmarks and ``holokv eval``)."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch


def commit() -> str:
    """The measured commit: HOLOKV_COMMIT when the tree travelled without .git, else git's HEAD of the
    source tree this package runs from or, for an installed (copied) package, of the working directory."""
    if os.environ.get("HOLOKV_COMMIT"):
        return os.environ["HOLOKV_COMMIT"]
    for where in (Path(__file__).parent, Path.cwd()):
        try:
            return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                  cwd=where).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            pass
    return "unknown"


def provenance(device: str | torch.device | None = None) -> dict:
    """Commit, torch version, ``holokv.build_info()``, host and ``device`` (default: the GPU if there is one)."""
    import holokv

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = {"commit": commit(), "torch": torch.__version__, "holokv": holokv.build_info(),
            "host": platform.machine()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["device"] = {"name": p.name, "sms": p.multi_processor_count,
                          "l2_bytes": getattr(p, "L2_cache_size", None), "memory_bytes": p.total_memory}
    else:
        info["device"] = {"name": device.type}
    return info
