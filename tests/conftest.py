import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import holokv  # noqa: F401  registers the ops
from holokv.caches import use_holokv_attention

CUDA = torch.cuda.is_available() and holokv.build_info()["cuda"]
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and a CUDA build of holokv")


def dtype_id(dtype: torch.dtype) -> str:
    """Readable test ids (``bfloat16``), so that ``-k bfloat16`` selects a dtype."""
    return str(dtype).removeprefix("torch.")


def tiny_llama(layers: int = 2, head_dim: int = 32):
    """A random tiny Llama (4 query / 2 KV heads, vocabulary 128, seed 0) on the holokv attention, in eval mode."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=1024)
    return use_holokv_attention(LlamaForCausalLM(config).eval())
