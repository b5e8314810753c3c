"""The ``"holokv"`` attention implementation of transformers.

Models call ``cache.update(k, v, layer_idx)`` and then the registered attention
function with whatever ``update`` returned. Our cache layers store the new
tokens in ``update`` and leave themselves here; the attention function below
picks the layer up (checking that the key tensor is the very one ``update``
returned, so a foreign cache falls through to plain SDPA) and lets the layer
read its own, compressed, storage.
"""
from __future__ import annotations

import inspect
import threading

import torch
from transformers import AttentionInterface, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "holokv"
_handoff = threading.local()
# transformers 5.24 renamed forward/generate's ``past_key_values`` to ``cache`` (the old name warns).
CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def hand_over(layer, key) -> None:
    """Called by a layer's ``update``: the next attention call reads ``layer``."""
    _handoff.item = (key, layer)


@torch.compiler.disable  # the layers' Python state: under torch.compile, a graph break (holokv.compiled_layers)
def holokv_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    item = getattr(_handoff, "item", None)
    if item is None or item[0] is not key:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    _handoff.item = None
    scale = module.head_dim ** -0.5 if scaling is None else scaling
    return item[1].attend(query, attention_mask, scale), None


AttentionInterface.register(NAME, holokv_attention)
# Same boolean [B, 1, q, kv] masks as SDPA (None when plainly causal); without a registered
# mask function transformers would drop the padding mask for an unknown implementation.
AttentionMaskInterface.register(NAME, sdpa_mask)


def after_forward(model, args, kwargs, output) -> None:
    """Forward hook: a cache that needs the whole model once its prompt is in (KVzip's reconstruction pass) gets
    it, with the input ids, after each forward; the others have no ``after_forward``."""
    step = getattr(kwargs.get(CACHE_KWARG, kwargs.get("past_key_values")), "after_forward", None)
    if step is not None:
        step(model, kwargs.get("input_ids", args[0] if args else None))


def use_holokv_attention(model):
    """Switch ``model`` to the ``"holokv"`` attention implementation (required by every cache here) and hook its
    forward for caches that need the whole model (:func:`after_forward`)."""
    model.set_attn_implementation(NAME)
    if after_forward not in model._forward_hooks.values():
        model.register_forward_hook(after_forward, with_kwargs=True)
    return model
