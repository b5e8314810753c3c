"""One run of ``holokv bench e2e`` (a method or baseline at one batch and context, or the copy bandwidth), in a
process of its own: eager timings change 1.5-10x once a compiled model has run in the same process.

    python -m holokv.bench.e2e_measure SPEC_JSON RESULT_PATH
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ..runtime import greedy
from .e2e_model import build_model, model_config, weight_bytes

# decode steps run under torch.cuda.set_sync_debug_mode("error") after the timed ones: at least these, and one of
# SRC's compression intervals where longer, so that a compression step is checked too
SYNC_STEPS = 16


def compression_every(method: str, options: dict, ratio: float, config, context: int) -> int | None:
    """Generated tokens between a layer's compression steps (SRC), None for caches without them."""
    from ..caches import make_cache

    layer = make_cache(method, config, ratio=ratio, **options).layers[0]
    return layer.steps_every(context) if hasattr(layer, "steps_every") else None


class Clock:
    """Marks on the device's timeline: CUDA events (recording one does not wait for the GPU), else the host clock."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start, end) -> float:
        if not self.cuda:
            return 1e3 * (end - start)
        end.synchronize()
        return start.elapsed_time(end)


def holokv_decoder(model, spec: dict, capacity: int):
    """(prefill, step, nbytes) through holokv's decode runtime."""
    from ..caches import make_cache, use_holokv_attention
    from ..runtime import Decoder

    use_holokv_attention(model)
    cache = make_cache(spec["name"], model.config, ratio=spec["ratio"], **spec["options"])
    decoder = Decoder(model, cache, graph=spec["graph"], compile=spec.get("compile", False))
    return lambda ids: decoder.prefill(ids, max_new_tokens=capacity), decoder.step, cache.nbytes


def host_syncs(step, tokens, n: int) -> str:
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(n):
            tokens = greedy(step(tokens))
        return "none"
    except RuntimeError as e:
        if "synchronizing" not in str(e):  # out of memory, CUDA errors: failures, not syncs
            raise
        return f"synchronized: {e}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def measure(spec: dict) -> dict:
    """Prefill once, then greedy decode steps: warm-up, timed (each on its own), host-sync check."""
    cuda = spec["device"] == "cuda"
    B, N, steps, warmup = spec["batch"], spec["context"], spec["steps"], spec["warmup"]
    config = model_config(spec["model"], spec["layers"], spec["smoke"])
    every = None if spec["kind"] == "baseline" else compression_every(spec["name"], spec["options"], spec["ratio"],
                                                                       config, N)
    # the first two compression steps fall in the warm-up (the first runs eagerly, a first use of its kernels and
    # library handles; the second captures each layer's graph), so the timed steps' mean is the amortized cost of
    # the replays; the warm-up steps are timed too and reported apart
    warmup = max(warmup, 2 * (every or 0) + 1)
    model = build_model(spec["model"], config, spec["device"], getattr(torch, spec["dtype"]))
    weights, weights_read = weight_bytes(model)
    mem_weights = torch.cuda.memory_allocated() if cuda else None
    ids = torch.randint(config.vocab_size, (B, N), generator=torch.Generator().manual_seed(1)).to(spec["device"])
    checked = max(SYNC_STEPS, every or 0)
    capacity = warmup + steps + checked + spec.get("profile", 0)
    if spec["kind"] == "baseline":
        from .e2e_baselines import static_decoder

        prefill, step, nbytes = static_decoder(model, spec["name"], B, N, capacity)
    else:
        prefill, step, nbytes = holokv_decoder(model, spec, capacity)
    clock = Clock(cuda)
    with torch.no_grad():
        start = clock.mark()
        tokens = greedy(prefill(ids))
        prefill_ms = clock.ms(start, clock.mark())
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        marks = [clock.mark()]
        for _ in range(warmup):
            tokens = greedy(step(tokens))
            marks.append(clock.mark())
        warmup_ms = [clock.ms(a, b) for a, b in zip(marks, marks[1:])]
        if cuda:
            torch.cuda.synchronize()
            mem_before = torch.cuda.memory_allocated()
        marks = [clock.mark()]
        for _ in range(steps):
            tokens = greedy(step(tokens))
            marks.append(clock.mark())
        step_ms = [clock.ms(a, b) for a, b in zip(marks, marks[1:])]
        mem = {}
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            mem = dict(mem_weights_bytes=mem_weights, mem_before_steps_bytes=mem_before, mem_peak_bytes=peak,
                       peak_above_weights_bytes=peak - mem_weights, step_transient_bytes=peak - mem_before)
        cache_bytes = nbytes()
        syncs = host_syncs(step, tokens, checked) if cuda else "not checked (CPU)"
        prof = {}
        if cuda and spec.get("profile"):
            from .e2e_profile import profile_steps

            prof = dict(profile=profile_steps(step, tokens, spec["profile"]))
    median = statistics.median(step_ms)
    # the mean carries what the median leaves out: work every few steps (SRC's compression), amortized
    return dict(prefill_ms=prefill_ms, step_ms=median, step_ms_mean=statistics.mean(step_ms), step_ms_all=step_ms,
                warmup_ms_all=warmup_ms,
                tokens_per_s=B / (median * 1e-3),
                cache_bytes=cache_bytes, host_syncs=syncs, sync_check_steps=checked, warmup_steps=warmup,
                compression_every=every, weights_bytes=weights, weights_read_bytes=weights_read,
                **mem, **prof)


def bandwidth() -> dict:
    from .common import ColdL2Timer, copy_bandwidth

    return dict(copy_bandwidth_Bps=copy_bandwidth(ColdL2Timer()))


def main(argv: list[str]) -> None:
    spec, path = json.loads(argv[0]), Path(argv[1])
    try:
        result = bandwidth() if spec["kind"] == "bandwidth" else measure(spec)
    except torch.OutOfMemoryError as e:  # one method out of memory: recorded, the run goes on
        result = dict(error=f"out of memory: {e}".splitlines()[0], oom=True)
    path.write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
