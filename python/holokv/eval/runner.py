"""The evaluation grid: methods x compression ratios, every task, one JSON + plot + table."""
from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from ..caches import make_cache
from ..caches.model_check import head_dim
from ..provenance import provenance
from . import bootstrap, data, ruler, tasks
from .model import ADAPTER_INFO, DEFAULT_MODEL, load_config, load_model
from .report import plot, table

TASKS = ("ppl", "passkey", "fidelity", "ruler")
CPU_TASKS = ("ppl", "passkey", "fidelity")  # the default on a CPU: RULER's generation is slow there


def default_tasks(device: str) -> list[str]:
    return list(CPU_TASKS if torch.device(device).type == "cpu" else TASKS)


# SRC as tuned on the tuning text (README, "SRC on KVzip's model-wide budgets"): KVzip's scores and model-wide budgets
# with a 0.4 floor, summaries fitted for the last 8 prompt queries and 64 stand-ins of later ones, bins of alike keys,
# each summary carrying its bin's own log-mass (not one fitted to those queries, which costs needles)
SRC_TUNED = ("src:score=recon:across=model:adaptive=0.4:recent=8:window=8:rank=2:future_queries=64:bin_order=key"
             ":mass=prior")


@dataclass
class EvalConfig:
    model: str = DEFAULT_MODEL
    device: str = "cpu"
    dtype: str = "float32"
    methods: list[str] = field(default_factory=lambda: ["holokv", "holokv:mode=full", "streaming", "topk", "h2o",
                                                        "snapkv", "expected", "tova", "kvzip", "src", SRC_TUNED])
    ratios: list[float] = field(default_factory=lambda: [2.0, 4.0, 8.0])
    context: int = 512  # tokens prefilled (and compressed) before scoring
    continuation: int = 32  # tokens scored after the context
    windows: int = 3  # text windows for perplexity (data.window_starts: the scored tokens never overlap)
    passkey_lengths: list[int] = field(default_factory=lambda: [512])
    passkey_depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    tasks: list[str] | None = None  # None: default_tasks(device)
    ruler_tasks: list[str] = field(default_factory=lambda: list(ruler.TASKS))
    ruler_lengths: list[int] = field(default_factory=lambda: [512])  # context tokens of each sample
    ruler_samples: int = 2  # per task and length
    split: str = "eval"  # pydoc topics scored: "tune" for choices, "eval" for results (data.py); other samples
    text: str | None = None  # text file for perplexity/fidelity instead of the pydoc topics
    adapter: str | None = None  # peft adapter folder merged into the model for every run, the full cache's too
    seed: int = 0
    out: str = "holokv-eval"


def parse_method(spec: str) -> tuple[str, dict]:
    """``"holokv:mode=full:k=8"`` -> ("holokv", {"mode": "full", "k": 8}); ``None`` is None (``src:every=None``)."""
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
        options[key] = None if value == "None" else value
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


def check(cfg: EvalConfig) -> None:
    """The options that need no model."""
    for what, chosen, known in (("tasks", cfg.tasks or [], TASKS), ("RULER tasks", cfg.ruler_tasks, ruler.TASKS)):
        unknown = set(chosen) - set(known)
        if unknown:
            raise ValueError(f"unknown {what} {sorted(unknown)}; choose from {known}")
    if cfg.split not in data.SPLITS:
        raise ValueError(f"unknown split {cfg.split!r}; choose from {data.SPLITS}")
    if cfg.text is not None and cfg.split != "eval":
        raise ValueError("--split tune picks pydoc topics; with --text, give the tuning text as the --text file")
    if cfg.ruler_samples < 1 or not cfg.ruler_tasks or min(cfg.ruler_lengths, default=0) < 1:
        raise ValueError("RULER needs a task, a sample and positive lengths")


def synthetic_prompts(cfg: EvalConfig, tokenizer) -> dict[str, list[tasks.Prompt]]:
    """The question-answering samples of each such task in ``cfg.tasks``."""
    seed = data.synthetic_seed(cfg.seed, cfg.split)
    out = {}
    if "passkey" in cfg.tasks:
        rng = random.Random(seed)
        out["passkey"] = []
        for n in cfg.passkey_lengths:
            for d in cfg.passkey_depths:
                ctx, question, key = data.passkey_prompt(tokenizer, n, d, rng)
                out["passkey"].append(tasks.Prompt(ctx, question, partial(tasks.passkey_match, key), 8,
                                                   dict(length=n, depth=d)))
    if "ruler" in cfg.tasks:
        out["ruler"] = ruler.prompts(tokenizer, cfg.ruler_tasks, cfg.ruler_lengths, cfg.ruler_samples, seed)
    return out


def run_eval(cfg: EvalConfig) -> dict:
    cfg = replace(cfg, tasks=cfg.tasks or default_tasks(cfg.device))
    check(cfg)
    runs = grid(cfg, load_config(cfg.model))
    started = time.time()
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model, cfg.device, cfg.dtype, cfg.adapter)
    text, text_info = data.corpus(cfg.text, cfg.split)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    starts = data.window_starts(ids.numel(), cfg.context, cfg.continuation, cfg.windows)
    ppl_windows = [ids[s: s + cfg.context + cfg.continuation] for s in starts]
    fid_window = ids[: cfg.context + 1]
    prompts = synthetic_prompts(cfg, tokenizer)

    steps = len(runs) * (("ppl" in cfg.tasks) * len(ppl_windows) + sum(map(len, prompts.values()))
                         + ("fidelity" in cfg.tasks))
    bar = tqdm(total=steps, desc="holokv eval", unit="step")
    exact = None
    for run in runs:
        def new_cache(run=run):
            words = dict(tokenizer=tokenizer) if run["method"] in ("kvzip", "src") else {}  # the request to repeat
            return make_cache(run["method"], model.config, ratio=run["ratio"], **words, **run["options"])

        bar.set_postfix_str(f"{run['spec']} x{run['ratio']:g}")
        if "ppl" in cfg.tasks:
            scored = []
            for w in ppl_windows:
                scored.append(tasks.continuation_nll(model, new_cache, w, cfg.context))
                bar.update()
            run["ppl_windows"] = {k: [s[k] for s in scored] for k in ("nll_sum", "tokens")}
            run["ppl"] = float(bootstrap.perplexity(**run["ppl_windows"]))
            run["bytes_per_token"] = scored[0]["bytes_per_token"]  # same context length as fidelity's
            run["end_bytes_per_token"] = scored[0]["end_bytes_per_token"]
            run["prefill_s"] = statistics.median(s["prefill_s"] for s in scored)  # robust to a first call
        for task, samples in prompts.items():
            detail = []
            for p in samples:
                said = tasks.answer(model, new_cache, tokenizer, p)
                detail.append(dict(p.info, score=p.score(said), output=said))
                bar.update()
            run[task] = sum(d["score"] for d in detail) / len(detail)
            run[f"{task}_detail"] = detail
        if "fidelity" in cfg.tasks:
            outputs, run["bytes_per_token"] = tasks.attention_outputs(model, new_cache, fid_window)
            exact = exact or outputs  # the full cache runs first
            run.update(tasks.fidelity(outputs, exact))
            bar.update()
    bar.close()
    if "bytes_per_token" in runs[0]:
        for run in runs:
            run["achieved_ratio"] = runs[0]["bytes_per_token"] / run["bytes_per_token"]
    bootstrap.intervals(runs, cfg.seed)
    trained = Path(cfg.adapter or "", ADAPTER_INFO)
    result = dict(config=asdict(cfg), provenance=dict(**provenance(cfg.device), dtype=cfg.dtype,
                                                      model=model_shape(model.config), corpus_tokens=ids.numel(),
                                                      text=text_info, window_starts=starts,
                                                      bootstrap=dict(draws=bootstrap.DRAWS, level=bootstrap.LEVEL,
                                                                     seed=cfg.seed, unit="window or prompt"),
                                                      adapter=json.loads(trained.read_text())
                                                      if cfg.adapter and trained.is_file() else None),
                  runtime_s=time.time() - started, runs=runs)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    plot(runs, out / "results.png", cfg)
    (out / "table.txt").write_text(table(runs))
    return result
