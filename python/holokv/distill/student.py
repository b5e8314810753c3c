"""Student and teacher from one copy of the weights.

The model runs the ``"holokv_distill"`` attention implementation, which reads whatever :func:`attending`
set for the current forward: a :class:`SuperposedReader` (the student: every prompt position attends to
what a HoloKV cache would serve it at decode), a :class:`~.prompt_cache.PromptCacheReader` (the student of
a cache that compresses the prompt once: continuation positions read the compressed prompt) or nothing
(exact SDPA: the teacher, with the LoRA adapters disabled, and the full-cache control's student). Training
sequences are never padded, but a padding mask is honoured as the caches' prefill honours it.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
from peft import LoraConfig, get_peft_model
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..caches import HoloSpec, check_model
from ..caches.model_check import head_dim
from ..caches.prefill_attention import holo_prefill_attention
from .prompt_cache import PROMPT_METHODS, PromptCacheReader

NAME = "holokv_distill"
_state = threading.local()


class SuperposedReader:
    """Causal attention of a whole sequence through a HoloKV cache of ``spec`` (differentiable; FlexAttention
    on CUDA)."""

    def __init__(self, spec: HoloSpec, config):
        self.spec = spec
        self.phase = torch.ops.holokv.phase_keys(spec.k, head_dim(config), check_model(config))

    def __call__(self, module, q, k, v, mask, scale):
        n = q.shape[2]
        pads = (torch.zeros(q.shape[0], dtype=torch.long, device=q.device) if mask is None
                else (~mask[:, 0, -1, :n]).sum(-1))
        if self.phase.device != k.device or self.phase.dtype != k.dtype:  # once, not per layer and step
            self.phase = self.phase.to(k)
        return holo_prefill_attention(q, k, v, self.phase, self.spec, pads, scale)


def distill_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """A reader is called with the layer's attention module (a cache reader reads that layer's cache), q, k, v
    after RoPE, transformers' boolean mask (None when plainly causal) and the scale."""
    read, outputs = getattr(_state, "read", None), getattr(_state, "outputs", None)
    if read is None:
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                        **kwargs)
    else:
        out = read(module, query, key, value, attention_mask, module.head_dim ** -0.5 if scaling is None else scaling)
    if outputs is not None:
        outputs.append(out)
    return out, None


AttentionInterface.register(NAME, distill_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)  # boolean masks, None when plainly causal (as for "holokv")


def reader(cfg, config):
    """What the student of the distillation run ``cfg`` (a DistillConfig) reads through: None for the exact
    cache."""
    if cfg.method in PROMPT_METHODS:
        return PromptCacheReader(cfg.method, cfg.ratio, cfg.prompt_len(), config)
    spec = cfg.spec()
    return None if spec is None else SuperposedReader(spec, config)


@contextmanager
def attending(read=None, record: bool = False):
    """Forwards inside read attention through ``read`` (None: exact). ``record``: the context value is a list
    that receives each layer's attention output [B, N, Hq, d] (the input of o_proj), in layer order."""
    _state.read, _state.outputs = read, ([] if record else None)
    try:
        yield _state.outputs
    finally:
        _state.read = _state.outputs = None


def with_lora(model, rank: int, alpha: float, dropout: float, targets: list[str]):
    """``model`` switched to the distillation attention, with fresh LoRA adapters on ``targets`` (a PeftModel;
    ``disable_adapter()`` gives the teacher)."""
    model.set_attn_implementation(NAME)
    lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)
