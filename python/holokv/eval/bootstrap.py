"""Bootstrap confidence intervals for an evaluation grid, and for each method's difference to the full cache.

The unit resampled is the scored window (perplexity) or the prompt (passkey, RULER). Each is its own prefill
and compression of its own text, so they are the independent draws; the tokens of one window share one
compressed cache and one passage, so resampling tokens (or blocks of them) inside windows would count
correlated scores as independent and narrow the interval. Every run of a grid is resampled with the same
seeded draws of the same units, so a method's difference to the full cache is a paired bootstrap: what the
text does to both cancels, and the interval is on what the compression does. Percentile intervals; with few
units (under ~10) they are too narrow. ``intervals`` works from what ``results.json`` stores (per window NLL
sums and token counts, per prompt scores), so they can be recomputed with other draws or levels.
"""
from __future__ import annotations

import numpy as np

DRAWS = 10_000
LEVEL = 0.95
METRICS = ("ppl", "passkey", "ruler")


def draws(n: int, seed: int, count: int = DRAWS) -> np.ndarray:
    """[count, n] indices of ``count`` resamples (with replacement) of ``n`` units."""
    return np.random.default_rng(seed).integers(0, n, size=(count, n))


def interval(values: np.ndarray, level: float = LEVEL) -> dict:
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return dict(lo=float(lo), hi=float(hi))


def perplexity(nll_sum, tokens, idx=None) -> np.ndarray:
    """exp(total NLL / total tokens) of the windows, or of each resample of them (rows of ``idx``)."""
    nll_sum, tokens = np.asarray(nll_sum, float), np.asarray(tokens, float)
    if idx is None:
        return np.exp(nll_sum.sum() / tokens.sum())
    return np.exp(nll_sum[idx].sum(-1) / tokens[idx].sum(-1))


def mean(scores, idx=None) -> np.ndarray:
    scores = np.asarray(scores, float)
    return scores.mean() if idx is None else scores[idx].mean(-1)


def _statistic(run: dict, metric: str):
    """(the run's metric of resample indices, or of all units for None; the number of units)."""
    if metric == "ppl":
        w = run["ppl_windows"]
        return (lambda idx=None: perplexity(w["nll_sum"], w["tokens"], idx)), len(w["tokens"])
    scores = [s["score"] for s in run[f"{metric}_detail"]]
    return (lambda idx=None: mean(scores, idx)), len(scores)


def intervals(runs: list[dict], seed: int, count: int = DRAWS, level: float = LEVEL) -> None:
    """Adds, to every run and metric it has, ``{metric}_ci`` (lo, hi) and ``{metric}_vs_full`` (diff, lo, hi:
    the run's value minus the full cache's, ``runs[0]``, paired over the same resamples). Where two or more
    compressed runs share a ratio, each also gets ``ppl_vs_best`` (diff, lo, hi, other): its perplexity minus
    the lowest at that ratio, paired; the lowest's is its own minus the runner-up's (negative), so an
    interval that holds 0 says the winner is not told apart from noise."""
    full = runs[0]
    for metric in METRICS:
        if metric not in full:
            continue
        n = _statistic(full, metric)[1]
        idx = draws(n, seed, count)
        stats = []
        for run in runs:
            stat, n_run = _statistic(run, metric)
            if n_run != n:
                raise ValueError(f"{run['spec']} x{run['ratio']:g} has {n_run} {metric} units, the full cache {n}")
            stats.append((stat(), stat(idx)))
        for run, (value, values) in zip(runs, stats):
            run[f"{metric}_ci"] = interval(values, level)
            run[f"{metric}_vs_full"] = _paired(value, values, *stats[0], level)
        if metric == "ppl":
            _versus_best(runs[1:], stats[1:], level)


def _paired(value, values, other, others, level) -> dict:
    return dict(diff=float(value - other), **interval(values - others, level))


def _versus_best(runs: list[dict], stats: list[tuple], level: float) -> None:
    for ratio in dict.fromkeys(run["ratio"] for run in runs):
        group = sorted((s[0], i) for i, s in enumerate(stats) if runs[i]["ratio"] == ratio)
        if len(group) < 2:
            continue
        best, next_ = group[0][1], group[1][1]
        for _, i in group:
            other = next_ if i == best else best
            runs[i]["ppl_vs_best"] = dict(**_paired(*stats[i], *stats[other], level), other=runs[other]["spec"])
