"""``holokv bench NAME``: the benchmarks, installed with the package; each saves JSON with provenance to ``--out``."""
from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {  # name: (module, what it measures)
    "decode": ("decode", "holo_decode over HoloKV's and SRC's cache formats against SDPA over the full cache"),
    "src": ("src_linalg", "SRC's compaction of one layer and its batched linear algebra against torch.linalg"),
    "stream": ("src_stream", "SRC's decode-time compression: its cost per generated token"),
    "e2e": ("e2e", "a Llama-3-8B-shaped model decoding with each cache against transformers' StaticCache"),
    "prefill": ("prefill", "HoloKV's training attention, forward and backward, against SDPA's"),
    "linear": ("linear", "a decode step's linear layers: decode_linear (Triton) against cuBLAS"),
}


def add_parser(sub) -> None:
    """Adds ``bench`` to the ``holokv`` subcommands: each benchmark module gives ``add_arguments(parser)`` and
    ``run(args) -> int`` (the exit status)."""
    listing = "\n".join(f"  {name:7s} {what}" for name, (_, what) in BENCHMARKS.items())
    bench = sub.add_parser("bench", help="run a benchmark", description=f"{__doc__}\n\n{listing}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    names = bench.add_subparsers(dest="bench", required=True)
    for name, (module, what) in BENCHMARKS.items():
        mod = importlib.import_module(f"{__name__}.{module}")
        p = names.add_parser(name, help=what, description=mod.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(run=mod.run)
