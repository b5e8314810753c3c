"""One grid from ``holokv eval`` runs that separate processes made over the same windows and prompts (groups of
methods, or of ratios, side by side on one GPU, whose step is bound by the host): the full cache once, every other
run once, and the intervals recomputed over one set of resamples, so the result is what one process running every
method would have written. It refuses inputs that do not pair: another configuration (methods, ratios and output
folder aside), another provenance (device, build, model, windows...), or a full cache that scored differently.
Parts of other commits pair when all that holds (a method added later beside runs already made): each part's commit
is kept in ``parts``, and the merged provenance lists them all."""
from __future__ import annotations

import json
from pathlib import Path

from . import bootstrap
from .report import plot, table
from .runner import EvalConfig

FREE = ("methods", "ratios", "out")  # the configuration's fields that may differ between the parts
MEASURED = ("ppl_windows", "passkey_detail", "ruler_detail", "bytes_per_token", "cosine")  # the full cache's
DERIVED = ("_ci", "_vs_full", "_vs_best")  # keys that bootstrap.intervals recomputes over the merged grid
CODE = ("commit", "dirty")  # the provenance's fields that may differ between the parts (kept per part)


def merge(parts: list[str], out: str) -> dict:
    """Reads ``results.json`` of every folder in ``parts``, writes the merged grid's files to ``out``."""
    if len(parts) < 2:
        raise ValueError("--merge needs two or more result folders")
    results = []
    for part in parts:
        try:
            results.append(json.loads(Path(part, "results.json").read_text()))
        except (OSError, ValueError) as e:
            raise ValueError(f"--merge {part}: no readable results.json ({e})") from e
    first = results[0]
    runs, seen = [_clean(first["runs"][0])], set()
    for part, result in zip(parts, results):
        if _fixed(result["config"], FREE) != _fixed(first["config"], FREE):
            raise ValueError(f"--merge {part}: another configuration than {parts[0]}'s (methods and ratios aside)")
        if _fixed(result["provenance"], CODE) != _fixed(first["provenance"], CODE):
            raise ValueError(f"--merge {part}: another provenance than {parts[0]}'s (device, build, windows...)")
        full, *rest = result["runs"]
        if any(full.get(k) != first["runs"][0].get(k) for k in MEASURED):
            raise ValueError(f"--merge {part}: its full cache scored otherwise than {parts[0]}'s (nondeterministic "
                             "kernels?); the runs do not pair: run them in one process")
        for run in rest:
            key = (run["spec"], run["ratio"])
            if key in seen:
                raise ValueError(f"--merge {part}: {run['spec']} x{run['ratio']:g} is in two parts")
            seen.add(key)
            runs.append(_clean(run))
    bootstrap.intervals(runs, first["config"]["seed"])
    config = dict(first["config"], methods=list(dict.fromkeys(m for r in results for m in r["config"]["methods"])),
                  ratios=sorted({x for r in results for x in r["config"]["ratios"]}), out=out)
    commits = list(dict.fromkeys(r["provenance"]["commit"] for r in results))
    provenance = dict(first["provenance"], **({} if len(commits) == 1 else dict(commit=commits, dirty=None)))
    merged = dict(config=config, provenance=provenance,
                  runtime_s=max(r["runtime_s"] for r in results),  # the parts ran side by side
                  parts=[dict(folder=p, methods=r["config"]["methods"], ratios=r["config"]["ratios"],
                              runtime_s=r["runtime_s"], **{k: r["provenance"][k] for k in CODE})
                         for p, r in zip(parts, results)], runs=runs)
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps(merged, indent=1))
    plot(runs, path / "results.png", EvalConfig(**config))
    (path / "table.txt").write_text(table(runs))
    return merged


def _fixed(fields: dict, free: tuple[str, ...]) -> dict:
    return {k: v for k, v in fields.items() if k not in free}


def _clean(run: dict) -> dict:
    return {k: v for k, v in run.items() if not k.endswith(DERIVED)}
