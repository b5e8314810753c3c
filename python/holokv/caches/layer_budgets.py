"""Layer-adaptive budgets (PyramidKV, Cai et al. 2024): the lower layers, whose attention is spread over the
whole context, keep more entries; the upper ones, which attend to a few tokens, fewer. The layers' budgets fall
linearly with depth from (2 - 1/β) to 1/β of the mean budget, so their sum stays the uniform one's; β = 1 is
uniform. A layer whose share would keep more than every token keeps every token (its ratio stops at 1), so a
cache never holds more than its nominal budget."""
from __future__ import annotations


def layer_ratios(ratio: float, layers: int, beta: float | None) -> list[float]:
    """Each layer's compression ratio, bottom first, for a cache of mean ``ratio`` (None: uniform)."""
    if beta is None or layers == 1:
        return [ratio] * layers
    top, bottom = 1 / beta, 2 - 1 / beta  # shares of the mean budget
    return [max(1.0, ratio / (bottom + (top - bottom) * i / (layers - 1))) for i in range(layers)]
