"""``holokv`` command line. ``holokv eval`` runs the quality-vs-memory grid, ``holokv bench`` the benchmarks,
``holokv distill`` trains LoRA adapters for a model that reads a HoloKV cache."""
from __future__ import annotations

import argparse
import math
import os
import sys


from .bench import add_parser as bench_parser
from .caches import METHODS
from .device_check import check_device
from .distill.cli import add_parser as distill_parser


def _list(cast):
    return lambda s: [cast(x) for x in s.split(",") if x]


def _eval_parser(sub):
    from .eval import TASKS, EvalConfig
    from .eval.data import SPLITS
    from .eval.runner import CPU_TASKS

    d = EvalConfig()
    p = sub.add_parser("eval", help="evaluate caches: methods x compression ratios",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=d.model,
                   help="causal LM: the bundled default, a local path or hub id, or a .gguf file")
    p.add_argument("--device", default=d.device)
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--methods", type=_list(str), default=d.methods,
                   help=f"comma-separated, each name[:key=value...]; names: {', '.join(METHODS)} "
                        "(the full cache always runs)")
    p.add_argument("--ratios", type=_list(float), default=d.ratios, help="compression ratios (bytes), >= 1")
    p.add_argument("--context", type=int, default=d.context, help="context tokens prefilled and compressed")
    p.add_argument("--continuation", type=int, default=d.continuation, help="tokens scored after the context")
    p.add_argument("--windows", type=int, default=d.windows, help="text windows for perplexity")
    p.add_argument("--passkey-lengths", type=_list(int), default=d.passkey_lengths)
    p.add_argument("--passkey-depths", type=_list(float), default=d.passkey_depths)
    p.add_argument("--tasks", type=_list(str), default=d.tasks,
                   help=f"subset of {','.join(TASKS)}; unset: all on a GPU, {','.join(CPU_TASKS)} on a CPU")
    p.add_argument("--ruler-tasks", type=_list(str), default=d.ruler_tasks, help="RULER-style tasks")
    p.add_argument("--ruler-lengths", type=_list(int), default=d.ruler_lengths,
                   help="context tokens of the RULER-style samples")
    p.add_argument("--ruler-samples", type=int, default=d.ruler_samples, help="per RULER task and length")
    p.add_argument("--split", default=d.split, choices=SPLITS,
                   help="pydoc topics scored (and passkey/RULER samples drawn): make choices on tune, report eval")
    p.add_argument("--text", default=d.text, help="UTF-8 text file scored instead of the pydoc topics")
    p.add_argument("--adapter", default=d.adapter,
                   help="peft LoRA adapter folder (holokv distill's OUT/adapter) merged into the model for every "
                        "method, the full cache included")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=d.out, help="output folder for results.json, results.png, table.txt")
    p.add_argument("--merge", nargs="+", metavar="FOLDER",
                   help="instead of evaluating, merge the results of runs made with the same settings but other "
                        "--methods (say side by side on one GPU) into --out, intervals recomputed")


def _check(args) -> None:
    """Argument errors that need no model (the methods need its config only: run_eval checks them first)."""
    if not all(math.isfinite(r) and r >= 1 for r in args.ratios):
        raise ValueError(f"--ratios must be >= 1 and finite, got {','.join(map(str, args.ratios))}")
    if args.text is not None:
        try:
            open(args.text, encoding="utf-8").close()
        except OSError as e:
            raise ValueError(f"--text {args.text}: {e.strerror or e}") from e
    if args.adapter is not None and not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
        raise ValueError(f"--adapter {args.adapter}: not a peft adapter folder (no adapter_config.json)")
    check_device(args.device)
    if args.context < 1 or args.continuation < 1 or args.windows < 1:
        raise ValueError("--context, --continuation and --windows must be positive")
    if any(not 0 <= d <= 1 for d in args.passkey_depths):
        raise ValueError(f"passkey depths must lie in [0, 1], got {args.passkey_depths}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="holokv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _eval_parser(sub)
    bench_parser(sub)
    distill_parser(sub)
    args = parser.parse_args(argv)
    if args.command in ("bench", "distill"):
        return args.run(args)
    from .eval import EvalConfig, run_eval
    from .eval.merge import merge
    from .eval.report import table

    cfg = EvalConfig(**{k: v for k, v in vars(args).items() if k not in ("command", "merge")})
    try:
        if args.merge:
            result = merge(args.merge, args.out)
        else:
            _check(args)
            result = run_eval(cfg)
    except ValueError as e:
        print(f"holokv eval: error: {e}", file=sys.stderr)
        return 2
    print(table(result["runs"]), end="")
    print(f"{len(result['runs'])} runs in {result['runtime_s']:.0f} s; results in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
