"""holokv distill: LoRA adapters trained so that the model reads a compressed cache (HoloKV, or one that
compresses the prompt once: SnapKV, Top-K, Expected Attention, SRC). The teacher is the model with exact
attention, the student the same weights with adapters, attending through the cache; the loss is the KL between
their next-token distributions on real text (for a prompt-compressing cache, of the continuation's tokens).
Writes OUT/adapter (peft), OUT/distill.json and OUT/checkpoint.pt (--resume). The arguments are
DistillConfig's fields, all checked before any model work."""
from __future__ import annotations

import argparse
import sys

from .config import METHODS, DistillConfig


def _list(s: str) -> list[str]:
    return [x for x in s.split(",") if x]


def add_parser(sub) -> None:
    d = DistillConfig()
    p = sub.add_parser("distill", help="distill LoRA adapters for a model that reads a HoloKV cache",
                       description=__doc__,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", default=d.model, help="causal LM: the bundled default, a local path or hub id, or a .gguf file")
    a("--method", default=d.method, choices=METHODS,
      help="cache the student reads: holokv; full (the control: the same LoRA, the exact cache); or a cache that "
           "compresses the prompt, its continuation read after it")
    a("--k", type=int, default=d.k, help="tokens per slot (1: no superposition, as --method full)")
    a("--ratio", type=float, default=d.ratio,
      help="bytes budget of the student's cache (holokv's default: k; required for the prompt-compressing methods)")
    a("--continuation", type=int, default=d.continuation,
      help="prompt-compressing methods: tokens of each sequence read after its compressed prompt, the ones scored "
           "(default: holokv eval's continuation)")
    a("--mode", default=d.mode, help="HoloKV read mode: aligned or full")
    a("--sinks", type=int, default=d.sinks)
    a("--slot-gain", type=float, default=d.slot_gain)
    a("--window-slots", type=int, default=d.window_slots, help="the most recent slots held (default: all)")
    a("--rank", type=int, default=d.rank, help="LoRA rank")
    a("--alpha", type=float, default=d.alpha, help="LoRA alpha (the update is scaled by alpha / rank)")
    a("--lora-dropout", type=float, default=d.lora_dropout)
    a("--targets", type=_list, default=d.targets, help="comma-separated modules that get adapters")
    a("--steps", type=int, default=d.steps)
    a("--batch", type=int, default=d.batch, help="sequences per step")
    a("--seq-len", type=int, default=d.seq_len, help="tokens per sequence")
    a("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    a("--warmup", type=int, default=d.warmup, help="linear warmup steps, then cosine decay")
    a("--weight-decay", type=float, default=d.weight_decay)
    a("--clip", type=float, default=d.clip, help="gradient norm clip")
    a("--temperature", type=float, default=d.temperature, help="of the KL's distributions")
    a("--mse-weight", type=float, default=d.mse_weight, help="weight of the per-layer attention-output MSE")
    a("--train-text", default=d.train_text, help="UTF-8 training text (default: the training pydoc topics)")
    a("--eval-text", default=d.eval_text, help="UTF-8 held-out text (default: the held-out pydoc topics)")
    a("--eval-seqs", type=int, default=d.eval_seqs, help="held-out sequences measured")
    a("--save-every", type=int, default=d.save_every, help="steps between checkpoints and held-out measures")
    a("--time-limit", type=float, default=d.time_limit, help="seconds after which training stops, checkpointed")
    a("--resume", action="store_true", help="continue the checkpoint in --out")
    a("--device", default=d.device)
    a("--dtype", default=d.dtype)
    a("--seed", type=int, default=d.seed)
    a("--out", default=d.out, help="output folder: adapter/, distill.json, checkpoint.pt")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..device_check import check_device
    from .train import distill

    cfg = DistillConfig(**{k: v for k, v in vars(args).items() if k not in ("command", "run")})
    try:
        check_device(cfg.device)
        log = distill(cfg)
    except ValueError as e:
        print(f"holokv distill: error: {e}", file=sys.stderr)
        return 2
    first, last = log["held_out"][0], log["held_out"][-1]
    print(f"held-out KL {first['kl']:.4f} -> {last['kl']:.4f}, perplexity {first['ppl']:.3f} -> {last['ppl']:.3f} "
          f"(teacher {last['ppl_teacher']:.3f}) after {log['steps_done']} steps; adapter in {cfg.out}/adapter")
    return 0
