"""Evaluation and CLI on a tiny random Llama with a byte-level tokenizer, saved locally (no network)."""
import json
import random
import subprocess

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from holokv.cli import main
from holokv.eval import EvalConfig, run_eval
from holokv.eval import data
from holokv.eval.runner import parse_method
from holokv import provenance
from holokv.provenance import commit, dirty


def byte_tokenizer():
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def save_tiny_llama(path, max_positions: int) -> None:
    """A seeded random 2-layer Llama (GQA 2:1, head_dim 32) and a byte tokenizer, saved to ``path``."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                         max_position_embeddings=max_positions, eos_token_id=256)
    LlamaForCausalLM(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_llama(path, 1024)
    return str(path)


def small(tiny_model, out, **kw):
    return EvalConfig(**{**dict(model=tiny_model, methods=["holokv", "snapkv", "streaming"], ratios=[2, 4],
                                context=96, continuation=4, windows=2, passkey_lengths=[96],
                                passkey_depths=[0.5], out=str(out)), **kw})


def test_run_eval_outputs_and_reproducible(tiny_model, tmp_path):
    first = run_eval(small(tiny_model, tmp_path / "a"))
    second = run_eval(small(tiny_model, tmp_path / "b"))
    for name in ("results.json", "results.png", "table.txt"):
        assert (tmp_path / "a" / name).stat().st_size > 0
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert [r["spec"] for r in saved["runs"]] == ["full"] + ["holokv"] * 2 + ["snapkv"] * 2 + ["streaming"] * 2
    timed = lambda runs: [{k: v for k, v in r.items() if k != "prefill_s"} for r in runs]  # noqa: E731
    assert timed(first["runs"]) == timed(second["runs"])
    prov = saved["provenance"]
    assert prov["commit"] and prov["torch"] == torch.__version__ and prov["holokv"]["version"]
    assert prov["device"]["name"] == "cpu" and prov["dtype"] == "float32"
    assert prov["model"] == dict(model_type="llama", layers=2, heads=4, kv_heads=2, head_dim=32, vocab=260)
    full, *rest = first["runs"]
    assert full["cosine"] == pytest.approx(1.0) and full["achieved_ratio"] == 1.0
    assert saved["config"]["tasks"] == ["ppl", "passkey", "fidelity"]  # RULER is off by default on a CPU
    assert saved["provenance"]["text"]["split"] == "eval" and len(saved["provenance"]["window_starts"]) == 2
    for run in saved["runs"]:  # the bootstrap's inputs are saved, its intervals in the table
        assert len(run["ppl_windows"]["nll_sum"]) == 2 and run["ppl_windows"]["tokens"] == [4, 4]
        assert run["ppl_ci"]["lo"] <= run["ppl"] <= run["ppl_ci"]["hi"]
        assert run["ppl_vs_full"]["lo"] <= run["ppl_vs_full"]["diff"] <= run["ppl_vs_full"]["hi"]
        assert {"passkey_ci", "passkey_vs_full"} <= set(run)
    assert full["ppl_vs_full"] == dict(diff=0.0, lo=0.0, hi=0.0)
    assert "ppl - full [95% CI]" in (tmp_path / "a" / "table.txt").read_text()
    for run in rest:
        assert run["bytes_per_token"] < full["bytes_per_token"]
        assert run["achieved_ratio"] > 0.7 * run["ratio"]
        assert {"ppl", "passkey", "cosine", "rel_l2"} <= set(run) and run["prefill_s"] > 0
    # one-shot SnapKV appends the decoded tokens exact; StreamingLLM evicts as it decodes (its bytes per token
    # fall while its per-entry positions cost it a little more than SnapKV to begin with)
    growth = {(r["spec"], r["ratio"]): r["end_bytes_per_token"] - r["bytes_per_token"] for r in rest}
    for ratio in (2, 4):
        assert growth["snapkv", ratio] > growth["streaming", ratio]


def test_task_subset(tiny_model, tmp_path):
    result = run_eval(small(tiny_model, tmp_path, methods=["h2o"], ratios=[2], tasks=["fidelity"]))
    assert [set(r) >= {"cosine", "bytes_per_token"} and "ppl" not in r for r in result["runs"]] == [True, True]


def test_tova_and_kvzip_in_the_grid(tiny_model, tmp_path, monkeypatch):
    """KVzip words its request with the model's tokenizer; each run reports its prefill time (KVzip's includes its
    reconstruction pass) and both hold exactly the budget."""
    import holokv.caches.kvzip as kvzip

    words = []
    monkeypatch.setattr(kvzip, "requests", lambda tok, ask=kvzip.requests: words.append(tok) or ask(tok))
    result = run_eval(small(tiny_model, tmp_path, methods=["tova", "kvzip"], ratios=[4], tasks=["ppl"]))
    assert [r["spec"] for r in result["runs"]] == ["full", "tova", "kvzip"]
    assert words[0] is None and words[1:] and None not in words[1:]  # the grid's check builds one without
    for run in result["runs"]:
        assert run["prefill_s"] > 0 and run["ppl"] < 1e3 and run["achieved_ratio"] == run["ratio"]


def test_ruler_in_the_grid(tiny_model, tmp_path):
    """RULER-style samples are asked after compression and scored per sample."""
    cfg = small(tiny_model, tmp_path, methods=["snapkv"], ratios=[2], tasks=["ruler"], ruler_tasks=["single"],
                ruler_lengths=[300])
    for run in run_eval(cfg)["runs"]:
        assert [(d["task"], d["length"]) for d in run["ruler_detail"]] == [("single", 300)] * 2
        assert all(0 <= d["score"] <= 1 and isinstance(d["output"], str) for d in run["ruler_detail"])
        assert run["ruler"] == sum(d["score"] for d in run["ruler_detail"]) / 2 and "ruler_vs_full" in run


def test_cli_eval(tiny_model, tmp_path, capsys):
    code = main(["eval", "--model", tiny_model, "--methods", "topk", "--ratios", "2", "--context", "64",
                 "--continuation", "2", "--windows", "1", "--passkey-lengths", "64", "--passkey-depths", "0.2",
                 "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "topk" in out and "bytes/tok" in out


@pytest.mark.parametrize("args, match", [
    (["--methods", "nope"], "unknown method"),
    (["--ratios", "0.5"], "ratios must be >= 1"),
    (["--methods", "holokv:k=4", "--ratios", "8"], "reaches ratios"),
    (["--methods", "holokv:k"], "not key=value"),
    (["--tasks", "ppl,dance"], "unknown tasks"),
    (["--passkey-depths", "1.5"], "depths"),
    (["--ruler-tasks", "single,nope"], "unknown RULER tasks"),
    (["--ruler-samples", "0"], "RULER needs"),
    (["--split", "tune", "--text", __file__], "--split tune picks pydoc topics"),
    (["--model", "/nonexistent/model"], "cannot load model"),
])
def test_cli_bad_input(tiny_model, tmp_path, capsys, args, match):
    argv = ["eval", "--model", tiny_model, "--out", str(tmp_path)] + args
    assert main(argv) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_text_too_short(tiny_model, tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("too short")
    assert main(["eval", "--model", tiny_model, "--text", str(text), "--out", str(tmp_path / "o")]) == 2
    assert "fewer than" in capsys.readouterr().err


def test_commit_from_environment(monkeypatch):
    monkeypatch.setenv("HOLOKV_COMMIT", "abc123")
    assert commit() == "abc123" and dirty() is None  # a travelled tree: whether it was dirty is not known here


def test_dirty_tree_is_recorded(tmp_path, monkeypatch):
    """A measurement from a tree whose tracked files differ from HEAD says so (outside a checkout: None)."""
    monkeypatch.delenv("HOLOKV_COMMIT", raising=False)
    monkeypatch.setattr(provenance, "__file__", str(tmp_path / "holokv" / "provenance.py"))  # not this checkout
    monkeypatch.chdir(tmp_path)
    assert dirty() is None and commit() == "unknown"
    git = lambda *a: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], check=True,  # noqa: E731
                                    capture_output=True)
    git("init", "-q")
    (tmp_path / "f.txt").write_text("a")
    git("add", "f.txt")
    git("commit", "-qm", "one")
    (tmp_path / "new.txt").write_text("untracked files do not count")
    assert dirty() is False and len(commit()) == 40
    (tmp_path / "f.txt").write_text("b")
    assert dirty() is True


def test_parse_method():
    assert parse_method("holokv:mode=full:k=8:slot_gain=2.5") == ("holokv", dict(mode="full", k=8, slot_gain=2.5))
    assert parse_method("src:every=None:window=8") == ("src", dict(every=None, window=8))


def test_windows_and_passkey():
    assert data.window_starts(100, 25, 5, 3) == [0, 35, 70]  # disjoint where they fit, spread to the end
    assert data.window_starts(100, 60, 10, 4) == [0, 10, 20, 30]  # else the contexts overlap, not the scored
    with pytest.raises(ValueError, match="fewer than"):
        data.window_starts(100, 60, 11, 4)
    tok = byte_tokenizer()
    ctx, question, key = data.passkey_prompt(tok, 300, 0.5, random.Random(0))
    assert len(ctx) == 300 and key in tok.decode(ctx) and "pass key" in tok.decode(question)
    assert data.passkey_prompt(tok, 300, 0.5, random.Random(0))[2] == key


def test_split_is_disjoint_and_deterministic():
    from pydoc_data.topics import topics

    tune, held = data.topic_split()
    assert not set(tune) & set(held) and set(tune) | set(held) == set(topics) and data.topic_split() == (tune, held)
    (tune_text, tune_info), (eval_text, eval_info) = data.corpus(split="tune"), data.corpus()
    assert eval_info["pydoc_topics"] == held and tune_info["pydoc_topics"] == tune
    assert 0.2 <= len(eval_text) / (len(tune_text) + len(eval_text)) < 0.3
    assert not any(topics[n] in tune_text for n in held if len(topics[n]) > 200) and "Python" in eval_text
    assert data.synthetic_seed(0, "eval") != data.synthetic_seed(0, "tune")


def test_merge_is_one_process_running_every_method(tiny_model, tmp_path, capsys):
    """Two processes' grids merged equal the grid of one process that ran both groups of methods, intervals
    included; a part at another ratio, or of another commit, joins the grid; parts that do not pair are refused,
    naming the part."""
    kw = dict(ratios=[2], tasks=["ppl", "passkey"])
    whole = run_eval(small(tiny_model, tmp_path / "whole", methods=["snapkv", "h2o"], **kw))
    for name, methods in (("a", ["snapkv"]), ("b", ["h2o"]), ("c", ["h2o"])):
        run_eval(small(tiny_model, tmp_path / name, methods=methods, **kw))
    assert main(["eval", "--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "results.json").read_text())
    timed = lambda runs: [{k: v for k, v in r.items() if k != "prefill_s"} for r in runs]  # noqa: E731
    assert timed(merged["runs"]) == timed(whole["runs"]) and "ppl_vs_best" in merged["runs"][1]
    assert merged["config"]["methods"] == ["snapkv", "h2o"] and len(merged["parts"]) == 2
    assert "h2o" in capsys.readouterr().out and (tmp_path / "m" / "table.txt").read_text().count("\n") == 5
    run_eval(small(tiny_model, tmp_path / "f", methods=["snapkv"], ratios=[4], tasks=kw["tasks"]))
    assert main(["eval", "--merge", *(str(tmp_path / n) for n in "abf"), "--out", str(tmp_path / "r")]) == 0
    merged = json.loads((tmp_path / "r" / "results.json").read_text())
    assert [(r["spec"], r["ratio"]) for r in merged["runs"][1:]] == [("snapkv", 2), ("h2o", 2), ("snapkv", 4)]
    assert merged["config"]["methods"] == ["snapkv", "h2o"] and merged["config"]["ratios"] == [2, 4]

    run_eval(small(tiny_model, tmp_path / "d", methods=["h2o"], ratios=[2], tasks=["ppl"]))  # other tasks
    b = (tmp_path / "b" / "results.json").read_text()
    for name, change in (("e", lambda t: t["runs"][0]["ppl_windows"]["nll_sum"].__setitem__(0, 1.0)),
                         ("g", lambda t: t["provenance"].__setitem__("commit", "other")),
                         ("h", lambda t: t["provenance"]["device"].__setitem__("name", "other"))):
        tampered = json.loads(b)
        change(tampered)
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(tampered))
    assert main(["eval", "--merge", str(tmp_path / "a"), str(tmp_path / "g"), "--out", str(tmp_path / "o")]) == 0
    merged = json.loads((tmp_path / "o" / "results.json").read_text())  # another commit pairs, and is recorded
    assert merged["provenance"]["commit"] == [whole["provenance"]["commit"], "other"]
    assert [p["commit"] for p in merged["parts"]] == merged["provenance"]["commit"]
    for parts, match in (([tmp_path / "a", tmp_path / "d"], "d: another configuration"),
                         ([tmp_path / "a", tmp_path / "e"], "e: its full cache scored otherwise"),
                         ([tmp_path / "a", tmp_path / "h"], "h: another provenance"),
                         ([tmp_path / "b", tmp_path / "c"], "c: h2o x2 is in two parts"),
                         ([tmp_path / "a"], "two or more"), ([tmp_path / "a", tmp_path / "none"], "none: no readable")):
        assert main(["eval", "--merge", *map(str, parts), "--out", str(tmp_path / "x")]) == 2
        assert match in capsys.readouterr().err
