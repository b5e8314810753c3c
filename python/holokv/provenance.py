"""What a measurement ran on: commit, torch, the holokv build and the device (benchmarks and ``holokv eval``)."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch


def _git(*args: str) -> str | None:
    """git's output in the source tree this package runs from or, for an installed (copied) package, in the
    working directory; None where neither is a git checkout."""
    for where in (Path(__file__).parent, Path.cwd()):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=where).stdout
        except (OSError, subprocess.CalledProcessError):
            pass
    return None


def commit() -> str:
    """The measured commit: HOLOKV_COMMIT when the tree travelled without .git, else git's HEAD (see _git)."""
    if os.environ.get("HOLOKV_COMMIT"):
        return os.environ["HOLOKV_COMMIT"]
    head = _git("rev-parse", "HEAD")
    return head.strip() if head else "unknown"


def dirty() -> bool | None:
    """Whether tracked files differ from the commit (the measured code is then not the commit's alone); None
    where that cannot be told (no git, or a tree that travelled as HOLOKV_COMMIT)."""
    if os.environ.get("HOLOKV_COMMIT"):
        return None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status.strip())


def provenance(device: str | torch.device | None = None) -> dict:
    """Commit (and whether the tree was dirty), torch version, ``holokv.build_info()``, host and ``device``
    (default: the GPU if there is one)."""
    import holokv

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = {"commit": commit(), "dirty": dirty(), "torch": torch.__version__, "holokv": holokv.build_info(),
            "host": platform.machine()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["device"] = {"name": p.name, "sms": p.multi_processor_count,
                          "l2_bytes": getattr(p, "L2_cache_size", None), "memory_bytes": p.total_memory}
    else:
        info["device"] = {"name": device.type}
    return info
