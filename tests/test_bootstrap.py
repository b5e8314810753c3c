"""Bootstrap intervals of an evaluation grid on synthetic runs with known answers."""
import math

import numpy as np
import pytest

from holokv.eval import bootstrap


def ppl_run(spec, nll_sum, tokens):
    nll_sum = list(map(float, nll_sum))
    return dict(spec=spec, ratio=1.0, ppl=float(bootstrap.perplexity(nll_sum, tokens)),
                ppl_windows=dict(nll_sum=nll_sum, tokens=list(tokens)))


def score_run(spec, scores):
    return dict(spec=spec, ratio=1.0, passkey=float(np.mean(scores)), passkey_detail=[dict(score=s) for s in scores])


# 16 windows of 32 tokens whose text varies a lot: per-token NLL from 1.5 to 4
TOKENS = [32] * 16
FULL = [32 * (1.5 + 2.5 * i / 15) for i in range(16)]


def test_identical_method_has_a_zero_difference():
    runs = [ppl_run("full", FULL, TOKENS), ppl_run("same", FULL, TOKENS)]
    bootstrap.intervals(runs, seed=0)
    assert runs[1]["ppl_vs_full"] == dict(diff=0.0, lo=0.0, hi=0.0)
    assert runs[1]["ppl_ci"] == runs[0]["ppl_ci"] and runs[0]["ppl_ci"]["lo"] < runs[0]["ppl"] < runs[0]["ppl_ci"]["hi"]


def test_unbiased_noise_keeps_zero_inside_a_tight_interval():
    noisy = [s + 0.5 * (-1) ** i for i, s in enumerate(FULL)]  # +-0.5 nats per window: no shift on average
    runs = [ppl_run("full", FULL, TOKENS), ppl_run("noisy", noisy, TOKENS)]
    bootstrap.intervals(runs, seed=0)
    diff, ci = runs[1]["ppl_vs_full"], runs[0]["ppl_ci"]
    assert diff["lo"] < 0 < diff["hi"]
    assert diff["hi"] - diff["lo"] < 0.1 * (ci["hi"] - ci["lo"])  # pairing cancels the windows' spread


def test_a_shift_is_detected_only_when_paired():
    shifted = [s + 0.05 * t for s, t in zip(FULL, TOKENS)]  # +0.05 nats per token everywhere
    runs = [ppl_run("full", FULL, TOKENS), ppl_run("worse", shifted, TOKENS)]
    bootstrap.intervals(runs, seed=0)
    full, worse = runs
    assert worse["ppl"] == pytest.approx(full["ppl"] * math.exp(0.05))
    assert worse["ppl_ci"]["lo"] < full["ppl_ci"]["hi"]  # the runs' own intervals overlap...
    assert 0 < worse["ppl_vs_full"]["lo"] < worse["ppl_vs_full"]["diff"] < worse["ppl_vs_full"]["hi"]  # ...not Δ


def test_interval_of_a_mean_matches_the_normal_one():
    scores = np.random.default_rng(1).normal(size=400)
    runs = [score_run("full", scores), score_run("same", scores)]
    bootstrap.intervals(runs, seed=3)
    half = 1.96 * scores.std() / math.sqrt(len(scores))
    ci = runs[0]["passkey_ci"]
    assert ci["lo"] == pytest.approx(scores.mean() - half, abs=0.15 * half)
    assert ci["hi"] == pytest.approx(scores.mean() + half, abs=0.15 * half)


def test_accuracy_difference_and_reproducibility():
    runs = [score_run("full", [1, 1, 0, 1]), score_run("none", [0, 0, 0, 0])]
    bootstrap.intervals(runs, seed=0)
    assert runs[1]["passkey_vs_full"]["diff"] == -0.75 and runs[1]["passkey_vs_full"]["hi"] < 0
    again = [score_run("full", [1, 1, 0, 1]), score_run("none", [0, 0, 0, 0])]
    bootstrap.intervals(again, seed=0)
    assert again == runs


def test_runs_must_score_the_same_units():
    runs = [ppl_run("full", FULL, TOKENS), ppl_run("short", FULL[:8], TOKENS[:8])]
    with pytest.raises(ValueError, match="8 ppl units, the full cache 16"):
        bootstrap.intervals(runs, seed=0)


def test_versus_the_best_at_each_ratio():
    """Each run's paired difference to the lowest perplexity at its ratio; the lowest's to the runner-up."""
    runs = [ppl_run("full", FULL, TOKENS), ppl_run("a", [s + 0.10 * t for s, t in zip(FULL, TOKENS)], TOKENS),
            ppl_run("b", [s + 0.02 * t for s, t in zip(FULL, TOKENS)], TOKENS),
            ppl_run("c", [s + 0.021 * t + 0.5 * (-1) ** i for i, (s, t) in enumerate(zip(FULL, TOKENS))], TOKENS),
            dict(ppl_run("alone", FULL, TOKENS), ratio=8.0)]
    for run in runs[1:4]:
        run["ratio"] = 4.0
    bootstrap.intervals(runs, seed=0)
    full, a, b, c, alone = runs
    assert "ppl_vs_best" not in full and "ppl_vs_best" not in alone  # nothing to compare with at its ratio
    assert b["ppl"] < c["ppl"] < a["ppl"]
    assert a["ppl_vs_best"]["other"] == "b" and a["ppl_vs_best"]["lo"] > 0  # a is worse, told apart
    assert a["ppl_vs_best"]["diff"] == pytest.approx(a["ppl"] - b["ppl"])
    assert c["ppl_vs_best"]["other"] == "b" and c["ppl_vs_best"]["diff"] > 0
    margin = b["ppl_vs_best"]  # the winner against the runner-up, c: within c's noise
    assert margin["other"] == "c" and margin["diff"] < 0 < margin["hi"] and margin["lo"] < 0
