"""What ``holokv bench e2e`` derives from its runs, its table and its plot."""
from __future__ import annotations

from pathlib import Path


def full_cache(row: dict) -> bool:
    return row["kind"] == "baseline" or row["name"] == "full"


def derive(rows: list[dict], bandwidth: float | None) -> None:
    """Adds to each measured row its floor (weights a step reads + cache bytes, over the copy bandwidth; needs
    the bandwidth), step / floor, peak memory above the weights / cache bytes, and its speedup over the fastest
    full-cache decode at the same (B, N)."""
    ok = [r for r in rows if "error" not in r]
    for r in ok:
        if bandwidth:
            r["floor_ms"] = 1e3 * (r["weights_read_bytes"] + r["cache_bytes"]) / bandwidth
            r["step_over_floor"] = r["step_ms"] / r["floor_ms"]
        if "peak_above_weights_bytes" in r:
            r["peak_above_weights_over_cache"] = r["peak_above_weights_bytes"] / r["cache_bytes"]
        fastest = min((f["step_ms"] for f in ok if full_cache(f) and (f["batch"], f["context"]) ==
                       (r["batch"], r["context"])), default=None)
        if fastest:
            r["speedup_vs_fastest_full"] = fastest / r["step_ms"]


def table(rows: list[dict]) -> str:
    def num(r, key, fmt, scale=1.0):
        return format(r[key] / scale, fmt) if r.get(key) is not None else format("-", ">" + fmt.split(".")[0])

    head = (f"{'method':22s} {'B':>3s} {'N':>6s} {'prefill ms':>10s} {'ms/step':>8s} {'mean':>8s} {'tok/s':>7s} "
            f"{'floor ms':>8s} "
            f"{'x floor':>7s} {'vs full':>7s} {'peak>w GB':>9s} {'cache GB':>8s}  host syncs\n")
    lines = [head]
    for r in rows:
        lead = f"{r['method']:22s} {r['batch']:3d} {r['context']:6d} "
        if "error" in r:
            lines.append(lead + "error: " + r["error"].splitlines()[-1][:80] + "\n")
            continue
        lines.append(lead + f"{num(r, 'prefill_ms', '10.1f')} {num(r, 'step_ms', '8.2f')} {num(r, 'step_ms_mean', '8.2f')} "
                            f"{num(r, 'tokens_per_s', '7.0f')} {num(r, 'floor_ms', '8.2f')} "
                            f"{num(r, 'step_over_floor', '7.2f')} {num(r, 'speedup_vs_fastest_full', '7.2f')} "
                            f"{num(r, 'peak_above_weights_bytes', '9.2f', 1e9)} {num(r, 'cache_bytes', '8.2f', 1e9)}  "
                            f"{r['host_syncs'][:40]}\n")
    return "".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """ms per decode step as bars grouped by (B, N), one bar per method, its floor marked across the bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["batch"], r["context"]) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) * len(methods)), 4.5))
    for i, method in enumerate(methods):
        for g, point in enumerate(groups):
            r = next((r for r in rows if r["method"] == method and (r["batch"], r["context"]) == point), None)
            x = g + (i - (len(methods) - 1) / 2) * width
            if r is None or "error" in r:
                ax.text(x, 0, "OOM" if r and r.get("oom") else "error", rotation=90, ha="center", va="bottom",
                        fontsize=7)
                continue
            ax.bar(x, r["step_ms"], width, color=f"C{i}", label=method)
            if r.get("floor_ms"):
                ax.hlines(r["floor_ms"], x - width / 2, x + width / 2, colors="k", linewidth=2,
                          label="floor: (weights + cache bytes) / copy bandwidth")
    ax.set_xticks(range(len(groups)), [f"B={b}, N={n}" for b, n in groups])
    ax.set_ylabel("ms per decode step")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # one entry per method and one for the floors
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
