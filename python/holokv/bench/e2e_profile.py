"""Where a decode step's time goes (``holokv bench e2e --profile STEPS``): the kernels that run in STEPS steps
(graph replays included: CUPTI records the kernels a graph launches), per step: their summed time, the time the
GPU is busy with at least one of them, the span from the first kernel's start to the last one's end, and the top
kernels by time. Span minus busy is the GPU idling between kernels (launch gaps, host work between replays)."""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from ..runtime import greedy

TOP = 20


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def profile_steps(step, tokens: torch.Tensor, steps: int) -> dict:
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            tokens = greedy(step(tokens))
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    spans = [(e.time_range.start, e.time_range.end) for e in kernels]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(e.time_range.elapsed_us())
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:TOP]
    ms = 1e-3 / steps
    return dict(
        steps=steps, kernels_per_step=len(kernels) / steps,
        kernel_ms_per_step=sum(e - s for s, e in spans) * ms,
        busy_ms_per_step=busy_us(spans) * ms,
        span_ms_per_step=(max(e for _, e in spans) - min(s for s, _ in spans)) * ms if spans else 0.0,
        top=[dict(name=name[:160], ms_per_step=sum(t) * ms, calls_per_step=len(t) / steps,
                  mean_us=sum(t) / len(t)) for name, t in top])
