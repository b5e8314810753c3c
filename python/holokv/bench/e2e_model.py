"""The model ``holokv bench e2e`` decodes with: Llama-3-8B's shapes cut to a few layers with random weights,
a tiny Llama for ``--smoke``, or real weights (``--model``)."""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

# Llama-3-8B's shapes; RoPE without Llama 3's long-context rescaling (it changes no cost)
LLAMA3_8B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                 intermediate_size=14336, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
                 max_position_embeddings=131072, tie_word_embeddings=False)
TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
            vocab_size=256, max_position_embeddings=4096)


def model_config(model: str | None, layers: int | None, smoke: bool):
    """The config to build: ``model``'s own (cut to ``layers`` when given), else Llama-3-8B's or the tiny one."""
    if model:
        config = AutoConfig.from_pretrained(model)
        if layers:
            config.num_hidden_layers = layers
        return config
    return LlamaConfig(**(TINY if smoke else LLAMA3_8B), num_hidden_layers=layers)


def build_model(model: str | None, config, device: str, dtype: torch.dtype):
    """The model in eval mode on ``device``; random weights (seed 0, the same in every process) unless ``model``."""
    if model:
        return AutoModelForCausalLM.from_pretrained(model, config=config, dtype=dtype).to(device).eval()
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def weight_bytes(model) -> tuple[int, int]:
    """(bytes of all parameters, bytes a decode step reads): a step reads every weight but the input
    embedding table, of which it gathers one row per sequence (unless the table is tied to the output head)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return total, total - (0 if emb is head else emb.numel() * emb.element_size())
