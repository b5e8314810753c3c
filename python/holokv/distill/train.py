"""The training loop: AdamW on the LoRA parameters, warmup then cosine decay, gradient clipping; held-out
measures and a checkpoint every ``save_every`` steps; the adapter saved in peft's format at the end.

Writes to ``out``: ``adapter/`` (``PeftModel.from_pretrained(base, out/adapter)``), ``distill.json`` (config,
provenance, data with the prompt length and the first position scored (prompt-compressing students), per-step
losses, held-out KL and perplexity from step 0 on, throughput) and ``checkpoint.pt``
(what ``resume`` restores: adapter, optimizer, scheduler, step, RNG; the data position is the step). By default
the held-out text is the evaluation side of the pydoc topics, which ``holokv eval`` scores.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from ..eval.model import ADAPTER_INFO, load_config, load_model
from ..eval.runner import model_shape
from ..provenance import provenance
from . import objective
from .config import RESUMABLE, DistillConfig, check, check_against, flag
from .data import Batches, sequences, texts
from .student import reader, with_lora


def _restore_point(cfg: DistillConfig) -> dict:
    """The checkpoint to resume, checked against ``cfg`` (options outside RESUMABLE must match)."""
    state = torch.load(cfg.checkpoint, map_location="cpu", weights_only=True)
    state["log"] = json.loads(state["log"])
    then, now = state["log"]["config"], asdict(cfg)
    changed = [f"{flag(k)} {then[k]!r} (now {now[k]!r})" for k in now if k not in RESUMABLE and then.get(k) != now[k]]
    if changed:
        raise ValueError(f"--resume: the checkpoint in {cfg.out} was trained with {', '.join(changed)}")
    return state


def _save(path: str, state: dict) -> None:
    """Written whole or not at all: an interrupted save leaves the previous checkpoint."""
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def _rng() -> dict:
    return dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [])


def _set_rng(rng: dict) -> None:
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])


def distill(cfg: DistillConfig, progress: bool = True) -> dict:
    """Train (or resume) a run; returns its log (also written to ``cfg.out/distill.json``)."""
    check(cfg)
    restored = _restore_point(cfg) if cfg.resume else None
    config = load_config(cfg.model)
    check_against(cfg, config)
    train_text, eval_text, data_info = texts(cfg.train_text, cfg.eval_text)

    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model, cfg.device, cfg.dtype)
    train = sequences(tokenizer, train_text, cfg.seq_len, flag("train_text") if cfg.train_text else "the training text")
    held = sequences(tokenizer, eval_text, cfg.seq_len, flag("eval_text") if cfg.eval_text else "the held-out text")
    held = held[: cfg.eval_seqs]
    batches = Batches(len(train), cfg.batch, cfg.seed)
    read, first = reader(cfg, config), cfg.first_scored()
    model = with_lora(model, cfg.rank, cfg.alpha, cfg.lora_dropout, cfg.targets)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = get_cosine_schedule_with_warmup(opt, cfg.warmup, cfg.steps)

    def measure(step):
        model.eval()
        log["held_out"].append(dict(step=step, **objective.held_out(model, held, read, cfg.batch, cfg.device, first)))
        model.train()

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if restored is None:
        step = 0
        log = dict(config=asdict(cfg), data=dict(**data_info, seq_len=cfg.seq_len, prompt=cfg.prompt_len(),
                                                 scored_from=first, train_sequences=len(train),
                                                 eval_sequences=len(held)),
                   provenance=dict(**provenance(cfg.device), dtype=cfg.dtype, model=model_shape(config),
                                   trainable_parameters=sum(p.numel() for p in params)),
                   losses=[], held_out=[], sessions=[])
        measure(0)
    else:
        set_peft_model_state_dict(model, restored["adapter"])
        opt.load_state_dict(restored["optimizer"])
        schedule.load_state_dict(restored["scheduler"])
        step, log = restored["step"], restored["log"]
        log["config"] = asdict(cfg)
        _set_rng(restored["rng"])

    def save():
        log["steps_done"] = step
        _save(cfg.checkpoint, dict(adapter=get_peft_model_state_dict(model), optimizer=opt.state_dict(),
                                   scheduler=schedule.state_dict(), step=step, rng=_rng(), log=json.dumps(log)))
        (out / "distill.json").write_text(json.dumps(log, indent=1))

    session = dict(first_step=step, steps=0, train_s=0.0)
    log["sessions"].append(session)
    started = time.perf_counter()
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc=f"holokv distill {cfg.method}", unit="step", disable=not progress)
    while step < cfg.steps:
        tick = time.perf_counter()
        ids = train[batches(step)].to(cfg.device)
        total, parts = objective.loss(model, ids, read, cfg.temperature, cfg.mse_weight, first)
        opt.zero_grad(set_to_none=True)
        total.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        lr = schedule.get_last_lr()[0]
        opt.step()
        schedule.step()
        step += 1
        log["losses"].append(dict(step=step, loss=total.item(), lr=lr, grad_norm=norm.item(),
                                  **{k: v.item() for k, v in parts.items()}))  # .item(): the step's time is done
        session["steps"] += 1
        session["train_s"] += time.perf_counter() - tick
        bar.update()
        bar.set_postfix(loss=f"{log['losses'][-1]['loss']:.4f}")
        stop = cfg.time_limit is not None and time.perf_counter() - started >= cfg.time_limit
        if step % cfg.save_every == 0 or step == cfg.steps or stop:
            measure(step)
            save()
        if stop:
            break
    bar.close()
    steps, seconds = (sum(s[key] for s in log["sessions"]) for key in ("steps", "train_s"))
    log["tokens_per_s"] = steps * cfg.batch * cfg.seq_len / seconds if seconds else None
    save()
    # peft records the base model's folder; the name holokv loads it by keeps machine paths out of the adapter
    model.peft_config["default"].base_model_name_or_path = cfg.model
    model.save_pretrained(out / "adapter", save_embedding_layers=False)
    (out / "adapter" / ADAPTER_INFO).write_text(json.dumps(dict(config=log["config"], steps_done=step,
                                                                held_out=log["held_out"][-1]), indent=1))
    return log
