"""Every cache option checked before any model runs (``make_cache``, ``holokv eval``): a bad value or an unknown
name raises a ValueError that names the option, instead of an arithmetic error at construction, a failure at
``generate``, or a silent fallback to the default."""
from __future__ import annotations

import math
from numbers import Integral, Real

from ..checks import PHASE_COUNTS
from ..reference import MODES
from .holo import PREFILLS
from .kvzip import ACROSS
from .model_check import head_dim
from .future_queries import SOURCES
from ..compaction.compact import BIN_ORDERS
from .src import MASSES, SCORES, SHRINK_TO


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def integer(lo: int, none_ok: bool = False, odd: bool = False, doc: str = "", words: tuple[str, ...] = ()):
    """An int (not a bool) >= lo, odd where asked, one of the strings ``words``, or None where none_ok; ``doc``
    says what it counts."""
    def check(name, value):
        if (none_ok and value is None) or (isinstance(value, str) and value in words):
            return
        if not (_is_int(value) and value >= lo and (not odd or value % 2 == 1)):
            kind = "odd int" if odd else "int"
            alternatives = [f"a positive {kind}" if lo == 1 else f"an {kind} >= {lo}", *map(repr, words)]
            alternatives += ["None"] if none_ok else []
            what = " or ".join(filter(None, [", ".join(alternatives[:-1]), alternatives[-1]]))
            raise ValueError(f"{name}{f' ({doc})' if doc else ''} must be {what}, got {value!r}")
    return check


def real(lo: float | None = None, hi: float | None = None, lo_open: bool = False, none_ok: bool = False):
    """A finite real number (not a bool) in [lo, hi], or (lo, ...) where lo_open (bounds of None: unbounded), or
    None where none_ok."""
    def check(name, value):
        if none_ok and value is None:
            return
        ok = _is_real(value)
        if ok and lo is not None:
            ok = value > lo if lo_open else value >= lo
        if ok and hi is not None:
            ok = value <= hi
        if not ok:
            bounds = (f" in [{lo}, {hi}]" if hi is not None else f" {'>' if lo_open else '>='} {lo}"
                      if lo is not None else "")
            raise ValueError(f"{name} must be a finite number{bounds}{' or None' if none_ok else ''}, got {value!r}")
    return check


def choice(*values):
    def check(name, value):
        if value not in values:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, values))}, got {value!r}")
    return check


def encoder(name, value):
    if value is not None and (isinstance(value, str) or not callable(getattr(value, "encode", None))):
        raise ValueError(f"{name} must be a tokenizer (with an encode method) or None, got {type(value).__name__}")


def phase_count(name, value):
    if value is not None and not (_is_int(value) and value in PHASE_COUNTS):
        raise ValueError(f"{name} (tokens per slot) must be one of {', '.join(map(str, PHASE_COUNTS))} or None "
                         f"(chosen from the ratio), got {value!r}")


# layer-adaptive budgets of the caches that compress the prompt (.layer_budgets): PyramidKV's β, the top layer
# keeping 1/β of the mean budget (1: uniform; None: off)
PYRAMID = {"pyramid": real(1, none_ok=True)}
# method -> its options and their checks (the options make_cache takes from the model config are not here)
OPTIONS = {
    "full": {},
    "holokv": {"k": phase_count, "sinks": integer(0), "mode": choice(*MODES),
               "prefill": choice(*PREFILLS), "slot_gain": real(0, lo_open=True),
               "window_slots": integer(1, none_ok=True, doc="the most recent slots held; None: all")},
    "streaming": {"sinks": integer(0), **PYRAMID},
    "topk": {"adaptive": real(0, 1, none_ok=True), **PYRAMID},
    "h2o": {"recent": real(0, 1), **PYRAMID},
    "snapkv": {"window": integer(1), "kernel": integer(1, odd=True), "adaptive": real(0, 1, none_ok=True), **PYRAMID},
    "expected": {"sinks": integer(0), "future": integer(1), "epsilon": real(0), "adaptive": real(0, 1, none_ok=True),
                 **PYRAMID},
    "tova": {**PYRAMID},
    "kvzip": {"sinks": integer(0), "adaptive": real(0, 1, none_ok=True), "across": choice(*ACROSS),
              "chunk": integer(1, doc="context tokens reconstructed per forward"), "tokenizer": encoder, **PYRAMID},
    "src": {"method": choice("softmax_ls", "seed"), "score": choice(*SCORES), "rank": integer(1),
            "ridge": real(0), "window": integer(1), "recent": integer(1), "sinks": integer(0),
            "bin_size": integer(1, none_ok=True, words=("head",), doc="prompt tokens a bin; head: per head's budget"),
            "decode_bin": integer(1, none_ok=True),
            "every": integer(1, none_ok=True, words=("auto",), doc="generated tokens between compression steps"),
            "lam": real(), "future_queries": integer(0, doc="stand-ins for the queries after the prompt"),
            "future": integer(1, doc="positions ahead the stand-ins are spread over"),
            "future_source": choice(*SOURCES), "shrink_to": choice(*SHRINK_TO), "mass": choice(*MASSES),
            "chunk": integer(1, doc="context tokens reconstructed per forward"), "tokenizer": encoder,
            "adaptive": real(0, 1, none_ok=True), "across": choice(*ACROSS),
            "bin_order": choice(*BIN_ORDERS), **PYRAMID},
}


def validate(method: str, ratio, options: dict, config) -> None:
    """Raise ValueError, naming the option, unless ``make_cache(method, config, ratio=ratio, **options)`` gets
    values its layers accept: ``ratio`` a finite number >= 1 (1 for "full"; at most k for "holokv"), and each
    option known to ``method`` and in its range."""
    if method not in OPTIONS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(OPTIONS)}")
    if not (_is_real(ratio) and ratio >= 1):
        raise ValueError(f"ratio must be >= 1 (a finite number: the bytes compression), got {ratio!r}")
    known = OPTIONS[method]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"{method} has no option {', '.join(unknown)}; its options are "
                         f"{', '.join(known) or 'none'}")
    for name, value in options.items():
        known[name](name, value)
    if method == "full" and ratio != 1:
        raise ValueError(f"ratio must be 1 for the full cache (it keeps every token), got {ratio!r}")
    pooled = options.get("across", ACROSS[0] if method == "kvzip" else None) == "model"
    if method in ("kvzip", "src") and pooled and options.get("pyramid") not in (None, 1):
        raise ValueError("pyramid sets each layer's budget, across='model' pools them all: give one of the two")
    if method == "holokv":
        k = options.get("k")
        reach = k or PHASE_COUNTS[-1]  # without k, the layer picks one for the ratio, up to 16
        if ratio > reach:
            raise ValueError(f"ratio must be at most k: HoloKV with k={reach} tokens per slot reaches ratios "
                             f"1..{reach}, got {ratio!r}")
        if k and head_dim(config) % (2 * k):
            raise ValueError(f"k={k} needs a head_dim divisible by {2 * k}; this model's is {head_dim(config)}")
