"""``holokv bench`` through the CLI: the e2e and stream smoke runs on the CPU and their JSON; e2e's derived numbers."""
import json

import pytest

from holokv.bench import BENCHMARKS
from holokv.bench.e2e import points
from holokv.bench.e2e_measure import SYNC_STEPS
from holokv.bench.e2e_report import derive
from holokv.cli import main

RUN_FIELDS = {"prefill_ms", "step_ms", "step_ms_all", "tokens_per_s", "cache_bytes", "host_syncs", "weights_bytes",
              "weights_read_bytes", "speedup_vs_fastest_full"}


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    status = main(["bench", "e2e", "--smoke", "--methods", "full,holokv:k=4", "--batch", "2", "--context", "64",
                   "--steps", "3", "--warmup", "1", "--out", str(out)])
    return status, json.loads((out / "e2e_bench.json").read_text()), out


def test_e2e_smoke_runs_every_method(e2e):
    status, result, out = e2e
    errors = [(r["method"], r["error"]) for r in result["rows"] if "error" in r]
    assert not errors and status == 0, errors
    assert {"commit", "torch", "transformers", "holokv", "device"} <= result.keys()
    assert result["config"]["shape"]["layers"] == 2 and result["config"]["points"] == [[2, 64]]
    assert [r["method"] for r in result["rows"]] == ["static", "static-compiled", "full", "holokv:k=4"]
    for r in result["rows"]:
        assert RUN_FIELDS <= r.keys(), r["method"]
        assert len(r["step_ms_all"]) == 3 and r["step_ms"] > 0 and r["prefill_ms"] > 0
        assert r["tokens_per_s"] == pytest.approx(2 / (r["step_ms"] * 1e-3))
    assert (out / "e2e_bench.png").stat().st_size > 0


def test_e2e_smoke_bytes(e2e):
    _, result, _ = e2e
    rows = {r["method"]: r for r in result["rows"]}
    tiny = result["config"]["shape"]  # K and V of every layer, slots for the prompt and every step, float32
    static = 2 * tiny["layers"] * 2 * tiny["kv_heads"] * (64 + 1 + 3 + SYNC_STEPS) * tiny["head_dim"] * 4
    assert rows["static"]["cache_bytes"] == rows["static-compiled"]["cache_bytes"] == static
    assert rows["holokv:k=4"]["cache_bytes"] < rows["full"]["cache_bytes"]
    # the input embedding table is not read by a step (one row per sequence is)
    assert result["weights_bytes"] - result["weights_read_bytes"] == tiny["vocab"] * tiny["hidden"] * 4


def test_stream_smoke(tmp_path):
    assert main(["bench", "stream", "--smoke", "--prompt", "256", "--tokens", "32", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "src_stream_smoke.json").read_text())
    plain, steps = result["rows"]
    assert plain["every"] is None and plain["steps"] == 0
    assert steps["every"] == 16 and steps["steps"] > 0 and "overhead_us_per_token" in steps
    assert {"commit", "torch", "device"} <= result.keys()


@pytest.mark.parametrize("args, match", [
    (["--batch", "1", "2", "--context", "8", "16", "32"], "pair up"),
    (["--methods", "nonsense"], "unknown method"),
    (["--baselines", "dynamic"], "unknown baseline"),
])
def test_e2e_bad_input(tmp_path, capsys, args, match):
    assert main(["bench", "e2e", "--smoke", "--out", str(tmp_path), *args]) == 2
    assert match in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name", BENCHMARKS)
def test_bench_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", name, "--help"])
    assert e.value.code == 0 and "--out" in capsys.readouterr().out


def test_points_pair_up():
    assert points([16, 1], [16384, 32768]) == [(16, 16384), (1, 32768)]
    assert points([1, 2], [8]) == [(1, 8), (2, 8)]


def test_derive_floor_and_speedup():
    def row(method, kind, step_ms, batch=16, **kw):
        return dict(dict(method=method, name=method.split(":")[0], kind=kind, batch=batch, context=1024,
                         step_ms=step_ms, weights_read_bytes=4e9, cache_bytes=2e9), **kw)

    rows = [row("static", "baseline", 9.0), row("full", "holokv", 6.0), row("holokv:k=4", "holokv", 3.0,
                                                                            cache_bytes=5e8),
            row("src", "holokv", 1.0, batch=1), row("snapkv", "holokv", 0.0, error="out of memory", oom=True)]
    derive(rows, bandwidth=2e12)
    assert rows[1]["floor_ms"] == pytest.approx(3.0) and rows[1]["step_over_floor"] == pytest.approx(2.0)
    assert rows[2]["floor_ms"] == pytest.approx(2.25)
    assert rows[2]["speedup_vs_fastest_full"] == pytest.approx(2.0)  # against full (6 ms), not static (9 ms)
    assert rows[0]["speedup_vs_fastest_full"] == pytest.approx(6 / 9)
    assert "speedup_vs_fastest_full" not in rows[3]  # no full-cache run at B=1
    assert "floor_ms" not in rows[4]


def test_profile_busy_time_is_the_union_of_kernel_intervals():
    from holokv.bench.e2e_profile import busy_us

    assert busy_us([]) == 0
    assert busy_us([(5, 6), (0, 2), (1, 3)]) == 4  # overlap counted once, unsorted input
    assert busy_us([(0, 10), (2, 3)]) == 10  # nested
