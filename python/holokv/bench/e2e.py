"""End-to-end decoding: a Llama-3-8B-shaped model (cut to --layers, random bf16 weights, or --model) prefills
B x N tokens, then decodes greedily with each holokv cache (holokv.runtime.Decoder: the decode step replayed from
a CUDA graph, the model's small operations fused by torch.compile unless --compile no) and with transformers'
StaticCache + SDPA, eager and compiled, each in a process of its own.

Per run: prefill ms (one run), ms per decode step (median of --steps steps, each timed with CUDA events, after
--warmup steps), tokens/s, peak memory above the weights while decoding, cache bytes, host syncs (steps run
under torch.cuda.set_sync_debug_mode("error")); against the floor (bytes a step must read: weights + cache,
over the copy bandwidth measured in the same run) and the fastest full-cache decode of the same (B, N).

    holokv bench e2e                                    # B=16, N=16K; writes bench/results/e2e_bench.json, .png
    holokv bench e2e --batch 16 1 --context 16384 32768 # two points: (16, 16K) and (1, 32K)
    holokv bench e2e --smoke                            # tiny Llama on the CPU, eager steps: checks the command
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers

from ..caches import METHODS, make_cache
from ..eval.runner import model_shape, parse_method
from .common import add_out, need_cuda, provenance, save
from .e2e_baselines import BASELINES
from .e2e_measure import SYNC_STEPS
from .e2e_model import model_config
from .e2e_report import derive, plot, table

FULL = dict(batch=[16], context=[16384], steps=64, warmup=5, layers=8, dtype="bfloat16")
SMOKE = dict(batch=[2], context=[64], steps=4, warmup=1, layers=2, dtype="float32")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=None, help="weights to load (path or hub id) instead of random ones")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 8, smoke 2; --model: all)")
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="sequences (default 16, smoke 2)")
    ap.add_argument("--context", type=int, nargs="+", default=None,
                    help="prompt tokens, paired with --batch (default 16384, smoke 64)")
    ap.add_argument("--steps", type=int, default=None, help="decode steps timed (default 64, smoke 4)")
    ap.add_argument("--warmup", type=int, default=None, help="decode steps before the timed ones (default 5, smoke 1)")
    ap.add_argument("--methods", default="full,holokv:k=4,src,snapkv,streaming",
                    help=f"comma-separated holokv caches, each name[:key=value...]; names: {', '.join(METHODS)}")
    ap.add_argument("--baselines", default=",".join(BASELINES), help=f"comma-separated subset of {BASELINES}")
    ap.add_argument("--ratio", type=float, default=4.0, help="compression ratio of the compressed caches")
    ap.add_argument("--compile", default="yes", choices=["yes", "no"],
                    help="holokv caches: fuse the model's own small operations with torch.compile before capturing "
                         "the step (holokv.compiled_layers; the first step compiles). Not with --smoke")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="weights and cache (default bfloat16, smoke float32)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="after the timed steps, profile STEPS more (CUDA): kernel time, GPU busy time and the top "
                         "kernels per step go into each row's 'profile'")
    ap.add_argument("--name", default="e2e_bench.json", help="results file in --out")
    ap.add_argument("--plot", default=None, help="plot file (default: --name with .png, in --out)")
    ap.add_argument("--smoke", action="store_true", help="tiny Llama on the CPU, eager decode steps")
    add_out(ap, smoke=True)


def points(batch: list[int], context: list[int]) -> list[tuple[int, int]]:
    """(B, N) pairs: the lists pair up, a single value goes with every value of the other."""
    if len(batch) != len(context) and 1 not in (len(batch), len(context)):
        raise ValueError(f"--batch and --context pair up: {len(batch)} values against {len(context)}")
    n = max(len(batch), len(context))
    return list(zip(batch * n if len(batch) == 1 else batch, context * n if len(context) == 1 else context))


def jobs(args, config) -> list[dict]:
    """One spec per (point, baseline or method); every cache is built once on the config so that bad names or
    options fail before any process starts."""
    base = dict(model=args.model, layers=config.num_hidden_layers, smoke=args.smoke, dtype=args.dtype,
                device="cpu" if args.smoke else "cuda", steps=args.steps, warmup=args.warmup,
                profile=args.profile)
    runs = []
    for name in filter(None, args.baselines.split(",")):
        if name not in BASELINES:
            raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
        runs.append(dict(kind="baseline", method=name, name=name))
    for spec in filter(None, args.methods.split(",")):
        name, options = parse_method(spec)
        ratio = 1.0 if name == "full" else args.ratio
        make_cache(name, config, ratio=ratio, **options)
        runs.append(dict(kind="holokv", method=spec, name=name, options=options, ratio=ratio, graph=not args.smoke,
                         compile=args.compile == "yes" and not args.smoke))
    return [dict(base, **run, batch=B, context=N) for B, N in points(args.batch, args.context) for run in runs]


def spawn(spec: dict) -> dict:
    """Run one spec in a fresh interpreter; a crash becomes an error entry with the end of its output."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "result.json"
        proc = subprocess.run([sys.executable, "-m", "holokv.bench.e2e_measure", json.dumps(spec), str(path)],
                              capture_output=True, text=True)
        if proc.returncode == 0 and path.exists():
            return json.loads(path.read_text())
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-12:]
        return dict(error=f"exit status {proc.returncode}: " + "\n".join(tail))


def payload(args, config, bandwidth, rows) -> dict:
    """The results file: provenance, the configuration, the copy bandwidth and the rows so far."""
    ok = [r for r in rows if "error" not in r]
    return {"bench": "e2e", **provenance(torch.device("cpu" if args.smoke else "cuda")),
            "transformers": transformers.__version__,
            "config": {"model": args.model or "random weights", "shape": dict(
                model_shape(config), hidden=config.hidden_size, intermediate=config.intermediate_size),
                       "dtype": args.dtype, "ratio": args.ratio, "compile": args.compile, "steps": args.steps,
                       "warmup": f"{args.warmup}, or two compression intervals + 1 where longer (each row's)",
                       "sync_check_steps": f"each row's, at least {SYNC_STEPS}",
                       "points": points(args.batch, args.context),
                       "methods": args.methods, "baselines": args.baselines, "smoke": args.smoke},
            "copy_bandwidth_Bps": bandwidth and bandwidth.get("copy_bandwidth_Bps"),
            "bandwidth_error": bandwidth and bandwidth.get("error"),
            "weights_bytes": ok[0]["weights_bytes"] if ok else None,
            "weights_read_bytes": ok[0]["weights_read_bytes"] if ok else None,
            "timing": "prefill: one run; step: median (and mean) of the timed steps, each between CUDA "
                      "events (host clock on the CPU), greedy argmax included",
            "rows": rows}


def run(args) -> int:
    for key, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, key) is None and not (key == "layers" and args.model):  # --model: all its layers
            setattr(args, key, value)
    if not args.smoke:
        need_cuda("e2e", " (--smoke runs on the CPU)")
    try:
        config = model_config(args.model, args.layers, args.smoke)
        specs = jobs(args, config)
    except (ValueError, TypeError) as e:
        print(f"holokv bench e2e: error: {e}", file=sys.stderr)
        return 2
    bandwidth = None if args.smoke else spawn(dict(kind="bandwidth"))
    bw = bandwidth and bandwidth.get("copy_bandwidth_Bps")
    rows, path = [], None
    for spec in specs:
        print(f"B={spec['batch']} N={spec['context']} {spec['method']} ...", end=" ", flush=True)
        rows.append(dict(spec, **spawn(spec)))
        error = rows[-1].get("error")
        print(error.splitlines()[-1] if error else f"{rows[-1]['step_ms']:.2f} ms/step", flush=True)
        derive(rows, bw)
        if not args.smoke or args.out:  # after every row: a run cut short keeps what it measured
            path = save(args.name, payload(args, config, bandwidth, rows), args.out)
    print(table(rows), end="")
    if path is not None:
        plot_path = Path(args.plot) if args.plot else path.with_suffix(".png")
        plot(rows, plot_path)
        print(f"wrote {path} and {plot_path}")
    return 1 if any("error" in r and not r.get("oom") for r in rows) else 0
