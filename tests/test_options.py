"""Cache options are validated by make_cache before any model runs: each bad value raises a ValueError whose
message starts with the option's name (no arithmetic errors, no failure at generate, no silent default)."""
import pytest
from transformers import LlamaConfig

from holokv.caches import LAYERS, make_cache
from holokv.caches.options import OPTIONS

NAN, INF = float("nan"), float("inf")
CONFIG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32)


class Words:
    """The least a tokenizer needs for KVzip's request: encode (one id per character)."""

    chat_template = None

    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 128 for c in text]


# one accepted value of every option, away from its default
VALID = {
    "full": {},
    "holokv": dict(k=8, sinks=0, mode="full", prefill="superposed", slot_gain=2.0, window_slots=3),
    "streaming": dict(sinks=0, pyramid=1),
    "topk": dict(adaptive=0.0, pyramid=None),
    "h2o": dict(recent=1, pyramid=2.5),
    "snapkv": dict(window=1, kernel=1, adaptive=None, pyramid=20),
    "expected": dict(sinks=0, future=1, epsilon=0.5, adaptive=1.0, pyramid=3),
    "tova": dict(pyramid=2),
    "kvzip": dict(sinks=0, adaptive=0.5, chunk=64, tokenizer=Words(), pyramid=4, across="layer"),
    "src": dict(method="seed", score="seed", rank=2, ridge=0.0, window=4, recent=8, sinks=0, bin_size=8,
                decode_bin=None, every=None, lam=-1.0, future_queries=3, future=8, future_source="gaussian",
                shrink_to="mean", chunk=64, tokenizer=Words(), pyramid=1.5, adaptive=0.3, across="layer",
                bin_order="key", mass="prior"),
}
COMPRESSED = [m for m in LAYERS if m != "full"]

BAD = [  # (method, ratio, options, the option named)
    *[(m, r, {}, "ratio") for m in ("holokv", "src") for r in (0, -2, NAN, INF)],
    *[(m, NAN, {}, "ratio") for m in ("streaming", "topk", "h2o", "snapkv", "expected", "tova", "kvzip")],
    ("topk", True, {}, "ratio"),
    ("snapkv", "4", {}, "ratio"),
    ("full", 2, {}, "ratio"),
    ("holokv", 8, dict(k=4), "ratio"),
    ("holokv", 17, {}, "ratio"),
    ("holokv", 2, dict(k=0), "k"),
    ("holokv", 2, dict(k=3), "k"),
    ("holokv", 2, dict(k=4.0), "k"),
    ("holokv", 2, dict(k=32), "k"),
    ("holokv", 2, dict(sinks=-1), "sinks"),
    ("holokv", 2, dict(sinks=1.5), "sinks"),
    ("holokv", 2, dict(mode="sideways"), "mode"),
    ("holokv", 2, dict(prefill="lazy"), "prefill"),
    *[("holokv", 2, dict(slot_gain=g), "slot_gain") for g in (NAN, INF, 0.0, -1.0, True)],
    *[("holokv", 2, dict(window_slots=w), "window_slots") for w in (0, -1, 1.5, True)],
    ("streaming", 2, dict(sinks=-5), "sinks"),
    *[("h2o", 2, dict(recent=r), "recent") for r in (2.0, -0.1, NAN)],
    ("snapkv", 2, dict(window=0), "window"),
    ("snapkv", 2, dict(kernel=0), "kernel"),
    ("snapkv", 2, dict(kernel=4), "kernel"),
    ("expected", 2, dict(sinks=-1), "sinks"),
    ("expected", 2, dict(future=0), "future"),
    *[("expected", 2, dict(epsilon=e), "epsilon") for e in (-1.0, INF)],
    *[(m, 2, dict(adaptive=a), "adaptive") for m in ("topk", "snapkv", "expected", "kvzip")
      for a in (1.5, -0.1, NAN, True)],
    ("kvzip", 2, dict(sinks=-1), "sinks"),
    *[("kvzip", 2, dict(chunk=c), "chunk") for c in (0, 2.0)],
    ("kvzip", 2, dict(tokenizer="gpt2"), "tokenizer"),
    ("kvzip", 2, dict(across="global"), "across"),
    ("kvzip", 2, dict(adaptive=None), "across"),  # the default pools head-adaptive budgets: it needs adaptive
    ("kvzip", 2, dict(pyramid=3), "pyramid"),  # the default pools every layer's budget
    ("kvzip", 2, dict(across="model", adaptive=0.0, pyramid=3), "pyramid"),
    ("src", 2, dict(across="global"), "across"),
    ("src", 2, dict(bin_order="random"), "bin_order"),
    ("src", 2, dict(across="model", score="recon", adaptive=0.2, pyramid=3), "pyramid"),
    ("src", 2, dict(method="evict"), "method"),
    ("src", 2, dict(score="h2o"), "score"),
    ("src", 2, dict(rank=0), "rank"),
    *[("src", 2, dict(ridge=r), "ridge") for r in (-1.0, NAN)],
    ("src", 2, dict(window=0), "window"),
    ("src", 2, dict(recent=0), "recent"),
    ("src", 2, dict(sinks=-1), "sinks"),
    ("src", 2, dict(bin_size=0), "bin_size"),
    ("src", 2, dict(decode_bin=1.5), "decode_bin"),
    ("src", 2, dict(every=0), "every"),
    ("src", 2, dict(every="often"), "every"),
    ("src", 2, dict(future_queries=-1), "future_queries"),
    ("src", 2, dict(future_queries=4, future=0), "future"),
    ("src", 2, dict(future_source="past"), "future_source"),
    ("src", 2, dict(future_source="recon"), "future_source"),  # no future_queries to take from the pass
    ("src", 2, dict(shrink_to="zero"), "shrink_to"),
    ("src", 2, dict(mass="fitted"), "mass"),
    ("src", 2, dict(chunk=0), "chunk"),
    ("src", 2, dict(lam=NAN), "lam"),
]


@pytest.mark.parametrize("method, ratio, options, name", BAD, ids=lambda x: repr(x) if not isinstance(x, str) else x)
def test_bad_value_names_the_option(method, ratio, options, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        make_cache(method, CONFIG, ratio=ratio, **options)


@pytest.mark.parametrize("method", COMPRESSED)
def test_unknown_option_lists_the_known_ones(method):
    known = ", ".join(OPTIONS[method]) or "none"
    with pytest.raises(ValueError, match=rf"{method} has no option colour; its options are {known}$"):
        make_cache(method, CONFIG, ratio=2, colour=1)


def test_every_option_is_one_the_layers_take():
    assert set(OPTIONS) == set(LAYERS) and all(set(VALID[m]) == set(OPTIONS[m]) for m in LAYERS)
    for method, options in VALID.items():
        make_cache(method, CONFIG, ratio=1 if method == "full" else 2, **options)
