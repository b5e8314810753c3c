"""The evaluation grid: methods x compression ratios, every task, one JSON + plot + table."""
from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..caches import make_cache
from ..caches.model_check import head_dim
from ..provenance import provenance
from . import data, tasks
from .model import ADAPTER_INFO, DEFAULT_MODEL, load_config, load_model
from .report import plot, table

TASKS = ("ppl", "passkey", "fidelity")


@dataclass
class EvalConfig:
    model: str = DEFAULT_MODEL
    device: str = "cpu"
    dtype: str = "float32"
    methods: list[str] = field(default_factory=lambda: ["holokv", "holokv:mode=full", "streaming", "topk", "h2o",
                                                        "snapkv", "expected", "src"])
    ratios: list[float] = field(default_factory=lambda: [2.0, 4.0, 8.0])
    context: int = 512  # tokens prefilled (and compressed) before scoring
    continuation: int = 32  # tokens scored after the context
    windows: int = 3  # disjoint text windows for perplexity
    passkey_lengths: list[int] = field(default_factory=lambda: [512])
    passkey_depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    text: str | None = None  # text file for perplexity/fidelity; default: Python's pydoc topics
    adapter: str | None = None  # peft adapter folder merged into the model for every run, the full cache's too
    seed: int = 0
    out: str = "holokv-eval"


def parse_method(spec: str) -> tuple[str, dict]:
    """``"holokv:mode=full:k=8"`` -> ("holokv", {"mode": "full", "k": 8})."""
    name, *opts = spec.split(":")
    options = {}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep:
            raise ValueError(f"method option {opt!r} in {spec!r} is not key=value")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        options[key] = value
    return name, options


def grid(cfg: EvalConfig, model_config) -> list[dict]:
    """The (method, ratio) runs, the full cache first; every cache is built once here so bad methods,
    options or ratios fail before any weights load."""
    runs = [dict(method="full", spec="full", ratio=1.0, options={})]
    for spec in cfg.methods:
        try:
            name, options = parse_method(spec)
            if name == "full":
                continue
            for ratio in cfg.ratios:
                make_cache(name, model_config, ratio=ratio, **options)
                runs.append(dict(method=name, spec=spec, ratio=ratio, options=options))
        except ValueError as e:
            raise ValueError(f"method {spec!r}: {e}") from e
    return runs


def model_shape(config) -> dict:
    """The sizes that decide the cache's bytes: layers, query and KV heads, head dim."""
    text = config.get_text_config(decoder=True)
    return dict(model_type=text.model_type, layers=text.num_hidden_layers, heads=text.num_attention_heads,
                kv_heads=text.num_key_value_heads, head_dim=head_dim(text), vocab=text.vocab_size)


def run_eval(cfg: EvalConfig) -> dict:
    unknown = set(cfg.tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; choose from {TASKS}")
    runs = grid(cfg, load_config(cfg.model))
    started = time.time()
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model, cfg.device, cfg.dtype, cfg.adapter)
    ids = tokenizer(data.corpus(cfg.text), return_tensors="pt", add_special_tokens=False).input_ids[0]
    ppl_windows = data.windows(ids, cfg.context + cfg.continuation, cfg.windows)
    fid_window = data.windows(ids, cfg.context + 1, 1)[0]
    rng = random.Random(cfg.seed)
    prompts = [(n, d, *data.passkey_prompt(tokenizer, n, d, rng)) for n in cfg.passkey_lengths
               for d in cfg.passkey_depths]

    steps = len(runs) * ("ppl" in cfg.tasks) * len(ppl_windows) + len(runs) * ("passkey" in cfg.tasks) * len(
        prompts) + len(runs) * ("fidelity" in cfg.tasks)
    bar = tqdm(total=steps, desc="holokv eval", unit="step")
    exact = None
    for run in runs:
        def new_cache(run=run):
            words = dict(tokenizer=tokenizer) if run["method"] == "kvzip" else {}  # KVzip's request to repeat
            return make_cache(run["method"], model.config, ratio=run["ratio"], **words, **run["options"])

        bar.set_postfix_str(f"{run['spec']} x{run['ratio']:g}")
        if "ppl" in cfg.tasks:
            nll_bytes = []
            for w in ppl_windows:
                nll_bytes.append(tasks.continuation_nll(model, new_cache, w, cfg.context))
                bar.update()
            run["ppl"] = tasks.perplexity([n for n, *_ in nll_bytes])
            run["bytes_per_token"] = nll_bytes[0][1]  # same context length as fidelity's
            run["end_bytes_per_token"] = nll_bytes[0][2]
            run["prefill_s"] = statistics.median(t for *_, t in nll_bytes)  # the median: robust to a first call
        if "passkey" in cfg.tasks:
            hits = []
            for n, d, ctx, question, key in prompts:
                hits.append(dict(length=n, depth=d, correct=tasks.passkey(model, new_cache, tokenizer, ctx,
                                                                        question, key)))
                bar.update()
            run["passkey"] = sum(h["correct"] for h in hits) / len(hits)
            run["passkey_detail"] = hits
        if "fidelity" in cfg.tasks:
            outputs, run["bytes_per_token"] = tasks.attention_outputs(model, new_cache, fid_window)
            exact = exact or outputs  # the full cache runs first
            run.update(tasks.fidelity(outputs, exact))
            bar.update()
    bar.close()
    if "bytes_per_token" in runs[0]:
        for run in runs:
            run["achieved_ratio"] = runs[0]["bytes_per_token"] / run["bytes_per_token"]
    trained = Path(cfg.adapter or "", ADAPTER_INFO)
    result = dict(config=asdict(cfg), provenance=dict(**provenance(cfg.device), dtype=cfg.dtype,
                                                      model=model_shape(model.config), corpus_tokens=ids.numel(),
                                                      adapter=json.loads(trained.read_text())
                                                      if cfg.adapter and trained.is_file() else None),
                  runtime_s=time.time() - started, runs=runs)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    plot(runs, out / "results.png", cfg)
    (out / "table.txt").write_text(table(runs))
    return result
