"""Eight holo_append steps at each e2e point (Llama-3-8B KV heads, k = 4, ratio 4: no exact share, so every fourth
step closes a slot and moves the sinks), for Nsight Compute (scripts/gpu_check.sh ncu)."""
import torch

import holokv  # noqa: F401  registers the ops

H, D, K, SINKS = 8, 128, 4, 4
dev, dt = "cuda", torch.bfloat16
phase = torch.ops.holokv.phase_keys(K, D, "half").to(dev, dt)
for B, N in ((1, 32768), (16, 16384)):
    closed = (N - SINKS) // K * K
    slots = [torch.randn(B, H, N // K + 64, D, device=dev, dtype=dt) for _ in range(2)]
    ring = [torch.randn(B, H, 64, D, device=dev, dtype=dt) for _ in range(2)]
    counters = [torch.full((B,), n, device=dev, dtype=torch.long) for n in (closed, N - closed, 0, 0)]
    for _ in range(8):
        k, v = (torch.randn(B, H, D, device=dev, dtype=dt) for _ in range(2))
        torch.ops.holokv.holo_append(k, v, phase, *slots, *ring, *counters[:3], SINKS, 0.0, 0, counters[3])
    torch.cuda.synchronize()
