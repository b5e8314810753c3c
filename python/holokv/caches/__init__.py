"""KV caches for transformers 5.x: HoloKV superposition, SRC compaction and token-selection baselines.

    from holokv.caches import make_cache, use_holokv_attention
    use_holokv_attention(model)
    cache = make_cache("holokv", model.config, ratio=4)
    model.generate(**inputs, past_key_values=cache)

Every cache needs the ``"holokv"`` attention implementation: its layers read their
own (compressed) storage there. ``ratio`` is the bytes budget: after each
compression a cache holds about ``tokens / ratio`` tokens' worth of K/V.
"""
from __future__ import annotations

from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from .base import CompressedCache, FullLayer
from .expected import ExpectedAttentionLayer
from .h2o import H2OLayer
from .hf_attention import NAME as ATTN_IMPLEMENTATION, use_holokv_attention
from .holo import HoloKVLayer
from .kvzip import KVzipCache, KVzipLayer
from .layer_budgets import layer_ratios
from .model_check import check_model, head_dim
from .options import validate
from .snapkv import SnapKVLayer
from .src import SRCLayer
from .streaming import StreamingLayer
from .superposed import HoloSpec, superposed_attention
from .topk import TopKLayer
from .tova import TOVALayer

LAYERS = {
    "full": FullLayer,
    "holokv": HoloKVLayer,
    "streaming": StreamingLayer,
    "topk": TopKLayer,
    "h2o": H2OLayer,
    "snapkv": SnapKVLayer,
    "expected": ExpectedAttentionLayer,
    "tova": TOVALayer,
    "kvzip": KVzipLayer,
    "src": SRCLayer,
}
CACHES = {"kvzip": KVzipCache, "src": KVzipCache}  # methods whose cache does more than hold its layers (a pass)
METHODS = tuple(LAYERS)


def make_cache(method: str, config, /, ratio: float = 1.0, **options) -> CompressedCache:
    """A cache for a model with ``config``. ``options`` go to the layer class (e.g. HoloKV's ``k``, ``sinks``,
    ``mode``, ``prefill``, ``slot_gain``, ``window_slots``; StreamingLLM's ``sinks``; SnapKV's ``window``; Expected
    Attention's ``sinks``, ``future``, ``epsilon`` (its ``rotary`` comes from the config); KVzip's ``sinks``;
    ``adaptive`` (head-adaptive budgets) for Top-K, SnapKV, Expected Attention, KVzip and SRC (with every=None);
    SRC's ``method``, ``score``, ``rank``, ``ridge``, ``shrink_to``, ``mass``, ``window``, ``bin_size``, ``sinks``,
    ``recent``, ``every``, ``decode_bin``, ``future_queries``, ``future``, ``future_source``, ``across``,
    ``bin_order``; TOVA has none; ``pyramid`` for every method that compresses the prompt: layer-adaptive budgets,
    see :mod:`.layer_budgets`), or to the cache where it takes them itself (KVzip's, and SRC's, ``chunk`` and
    ``tokenizer``, which words the request to repeat the context: the reconstruction pass runs after the prompt's
    forward, through the hook that :func:`use_holokv_attention` installs). Positional-only ``method`` leaves that
    name to SRC's option."""
    validate(method, ratio, options, config)  # before anything is built: each bad option named
    layout = check_model(config)
    text = config.get_text_config(decoder=True)
    if method == "holokv":
        options = dict(head_dim=head_dim(config), rope_layout=layout, **options)
    if method == "expected" or (method == "src" and SRCLayer.rotary_for(**options)):
        if layout != "half":
            raise ValueError(f"{method} de-rotates queries with rotate-half RoPE; this model's is {layout}")
        options = dict(rotary=LlamaRotaryEmbedding(text), **options)  # the Llama family's RoPE, from config
    cache = CACHES.get(method, CompressedCache)
    own = {name: options.pop(name) for name in cache.cache_options if name in options}
    ratios = layer_ratios(ratio, text.num_hidden_layers, options.pop("pyramid", None))
    layers = [LAYERS[method](ratio=r, **options) for r in ratios]
    return cache(layers, method, ratio, **own)


__all__ = ["ATTN_IMPLEMENTATION", "CompressedCache", "HoloSpec", "METHODS", "check_model", "make_cache",
           "superposed_attention", "use_holokv_attention"]
