"""What the benchmarks share: a cold-L2 CUDA-event timer, the measured copy bandwidth, provenance and saving."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..provenance import provenance  # noqa: F401  one record of what ran, for the benchmarks and holokv eval

RESULTS = Path("bench/results")  # relative to the current directory, like holokv eval's --out


def add_out(p, smoke: bool = False) -> None:
    """The ``--out`` option every benchmark has."""
    p.add_argument("--out", default=None, help=f"results folder (default {RESULTS}/ in the current directory"
                                               + ("; --smoke: nothing saved unless given)" if smoke else ")"))


def need_cuda(bench: str, hint: str = "") -> None:
    if not torch.cuda.is_available():
        raise SystemExit(f"holokv bench {bench}: needs a CUDA GPU{hint}")


class ColdL2Timer:
    """Median device time of fn() with the L2 flushed (a buffer twice its size is
    overwritten) before every timed call; the flush itself is outside the events."""

    def __init__(self):
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
        self.flush = torch.empty(2 * l2 // 4 + 1, dtype=torch.int32, device="cuda")

    def __call__(self, fn, reps: int = 50, warmup: int = 5) -> float:
        for _ in range(warmup):
            fn()
        start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for s, e in zip(start, end):
            self.flush.fill_(1)
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        times = sorted(s.elapsed_time(e) for s, e in zip(start, end))
        return 1e3 * times[len(times) // 2]  # microseconds


def copy_bandwidth(timer: ColdL2Timer, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy rate in bytes/s, counting bytes read plus written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    us = timer(lambda: dst.copy_(src), reps=20)
    return 2 * nbytes / (us * 1e-6)


def save(name: str, payload: dict, out_dir: str | Path | None = None) -> Path:
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
