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


def pytest_addoption(parser):
    parser.addoption("--shard", metavar="I/N", help="run every N-th selected test from the I-th (0-based), so that "
                                                    "N processes share a suite (scripts/gpu_check.sh)")


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected
def pytest_collection_modifyitems(config, items):
    shard = config.getoption("--shard")
    if shard is None:
        return
    try:
        i, n = map(int, shard.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        raise pytest.UsageError(f"--shard must be I/N with 0 <= I < N, got {shard!r}") from None
    config.hook.pytest_deselected(items=[t for j, t in enumerate(items) if j % n != i])
    items[:] = items[i::n]
