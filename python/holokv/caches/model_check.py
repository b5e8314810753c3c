"""Which models the caches can hold: decoder-only, full causal attention on every
layer, RoPE over the whole head in a known pairing (the phase keys must rotate
together with RoPE pairs). Checked from the config alone, before any weights load."""
from __future__ import annotations

# model_type -> RoPE pairing of dimensions ("half": i and i + d/2, HF rotate_half; "interleaved": 2i and 2i+1)
ROPE_LAYOUT = {
    **dict.fromkeys(["llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "granite",
                     "olmo", "olmo2", "phi3", "starcoder2", "gemma", "smollm3", "internlm2", "deepseek_v2"],
                    "half"),
    **dict.fromkeys(["cohere", "gptj"], "interleaved"),
}


def check_model(config) -> str:
    """Return the RoPE layout of ``config``'s model, or raise ValueError saying why it is unsupported."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    kind = getattr(config, "model_type", "?")
    if kind not in ROPE_LAYOUT:
        raise ValueError(f"model type {kind!r} is not supported: holokv needs a decoder with rotary position "
                         f"embeddings in a known layout ({', '.join(sorted(ROPE_LAYOUT))})")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"{kind}: RoPE on part of the head is not supported")
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types) or (
            not layer_types and getattr(config, "sliding_window", None) is not None):
        raise ValueError(f"{kind}: only full-attention layers are supported (this model has sliding/other layers)")
    return ROPE_LAYOUT[kind]


def head_dim(config) -> int:
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
