"""Stand-ins for the queries asked after a prompt, which SRC's prompt summaries are also fitted for (its
``future_queries`` and ``future_source`` options). The observation window's queries are all SRC fits by default;
its summaries then serve those and carry over poorly to the queries that follow. Each source gives M queries
[1, Hq, M, d] for one sequence's prompt queries q [1, Hq, n, d] (post-RoPE); none costs cache bytes."""
from __future__ import annotations

import torch

from .expected import prompt_gaussian, turn

SOURCES = ("replay", "gaussian", "recon")
DRAWS_SEED = 0  # the Gaussian's draws are fixed: the same prompt compacts alike on every run and device


def spread(n: int, m: int, start: int = 0, device=None) -> torch.Tensor:
    """m indices spread evenly over start .. n - 1 (repeats where m exceeds the count)."""
    return torch.linspace(min(start, n - 1), n - 1, m, device=device).round().long()


def ahead(pre: torch.Tensor, n: int, future: int, rotary) -> torch.Tensor:
    """Pre-RoPE queries pre [1, Hq, M, d] with RoPE at M positions spread evenly over n .. n + future − 1: where the
    queries after an n-token prompt will be."""
    at = n + spread(future, pre.shape[2], device=pre.device)
    cos, sin = rotary(pre, at[None])
    return turn(pre, cos[:, None], sin[:, None])


def replayed(q: torch.Tensor, m: int, sinks: int, future: int, rotary) -> torch.Tensor:
    """m of the prompt's own queries (evenly spaced past the sinks), their RoPE undone and redone ahead: the
    content of past queries at the positions of future ones."""
    n = q.shape[2]
    src = spread(n, m, sinks, q.device)
    cos, sin = rotary(q, src[None])
    return ahead(turn(q[:, :, src], cos[:, None], -sin[:, None]), n, future, rotary)  # RoPE at -pos undoes it


def gaussian(q: torch.Tensor, m: int, sinks: int, future: int, rotary) -> torch.Tensor:
    """m draws from Expected Attention's model of a query (per head, a Gaussian fitted to the prompt's pre-RoPE
    queries past the sinks), each placed ahead: the model's RoPE over the future positions sampled rather than
    averaged. The draws are fixed (``DRAWS_SEED``), the covariance's square root from its eigendecomposition (it is
    singular where the prompt is short)."""
    n, d = q.shape[2:]
    mu, cov, _ = prompt_gaussian(q, torch.arange(n, device=q.device).view(1, 1, n), rotary, sinks)
    evals, evecs = torch.linalg.eigh(cov)  # [1, Hq, d], [1, Hq, d, d]
    z = torch.randn(m, d, generator=torch.Generator().manual_seed(DRAWS_SEED)).to(q.device)
    pre = mu.unsqueeze(2) + (z * evals.clamp_min(0).sqrt().unsqueeze(2)) @ evecs.mT  # z · diag(√λ) · Uᵀ
    return ahead(pre, n, future, rotary)


class Heard:
    """The reconstruction pass's queries of each sequence, kept as they come, every s-th real one, s spacing about
    ``m`` of them over its prompt of n tokens (the pass reads about n queries), so that memory stays O(m)."""

    def __init__(self, m: int, lengths: list[int]):
        self.m, self.steps = m, [max(1, n // m) for n in lengths]
        self.rows = [[] for _ in lengths]
        self.counts = [0] * len(lengths)

    def add(self, q: torch.Tensor, pads: list[int]) -> None:
        """One pass's queries q [B, Hq, c, d], left-padded by ``pads``."""
        for b, (pad, step) in enumerate(zip(pads, self.steps)):
            real = q[b: b + 1, :, pad:]
            self.rows[b].append(real[:, :, -self.counts[b] % step:: step])
            self.counts[b] += real.shape[2]

    def queries(self, b: int) -> torch.Tensor:
        """[1, Hq, M, d], M <= m: sequence b's kept queries, m of them evenly spaced where more were kept."""
        kept = torch.cat(self.rows[b], 2)
        return kept[:, :, spread(kept.shape[2], self.m, device=kept.device).unique()]
