"""``holokv distill`` on a tiny random Llama (CPU, seconds): the objective learns, resume is exact (for HoloKV and
SRC students), the adapter loads with peft and decodes through a HoloKV cache and in ``holokv eval`` (an SRC
student's through SRC's cache, and the report pairs it with that cache), the default text split is disjoint,
and bad arguments fail before any model work."""
import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from test_eval import save_tiny_llama
from transformers import LlamaForCausalLM

from holokv.caches import HoloSpec, make_cache, use_holokv_attention
from holokv.cli import main
from holokv.distill import DistillConfig, distill, train
from holokv.distill import data, objective
from holokv.distill.report import summarize
from holokv.distill.student import SuperposedReader, with_lora
from holokv.eval import EvalConfig, run_eval


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, training text file, held-out text file)."""
    path = tmp_path_factory.mktemp("tiny")
    save_tiny_llama(path / "model", 256)
    train_topics, held_topics = data.topic_split()
    from pydoc_data.topics import topics
    (path / "train.txt").write_text("".join(topics[n] for n in train_topics)[:3000])
    (path / "eval.txt").write_text("".join(topics[n] for n in held_topics)[:1000])
    return str(path / "model"), str(path / "train.txt"), str(path / "eval.txt")


def config(tiny, out, **kw):
    model, train_text, eval_text = tiny
    return DistillConfig(**{**dict(model=model, train_text=train_text, eval_text=eval_text, k=2, steps=4, batch=2,
                                   seq_len=32, lr=1e-2, warmup=1, eval_seqs=4, save_every=2,
                                   targets=["q_proj", "v_proj", "o_proj"], out=str(out)), **kw})


# method -> its runs' settings beyond config()'s: SRC's student reads an 80-token prompt compacted at 2x
RUNS = {"holokv": {}, "src": dict(method="src", ratio=2, seq_len=96, continuation=16)}


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """method -> (log, out folder) of a run of 4 steps with RUNS' settings, checkpointed at 2 and 4 (made once)."""
    made = {}

    def run(method):
        if method not in made:
            out = tmp_path_factory.mktemp(f"whole-{method}")
            made[method] = distill(config(tiny, out, **RUNS[method]), progress=False), out
        return made[method]
    return run


@pytest.fixture(scope="module")
def whole(trained):
    return trained("holokv")


def test_loss_decreases_on_a_fixed_batch(tiny):
    torch.manual_seed(0)
    model = with_lora(LlamaForCausalLM.from_pretrained(tiny[0]), 4, 8.0, 0.0, ["q_proj", "v_proj", "o_proj"])
    read = SuperposedReader(HoloSpec(k=4, ratio=4, mode="full", window_slots=6), model.config)
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss, parts = objective.loss(model, ids, read, temperature=2.0, mse_weight=1.0)
        assert set(parts) == {"kl", "mse"}
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0 and losses[-1] < 0.5 * losses[0], losses


class Killed(Exception):
    pass


@pytest.mark.parametrize("method", RUNS)
def test_resume_continues_as_if_uninterrupted(tiny, trained, method, tmp_path, monkeypatch):
    whole = trained(method)
    real_save = train._save

    def save_then_die(path, state):
        real_save(path, state)
        raise Killed  # killed right after the step-2 checkpoint

    monkeypatch.setattr(train, "_save", save_then_die)
    with pytest.raises(Killed):
        distill(config(tiny, tmp_path / "cut", **RUNS[method]), progress=False)
    monkeypatch.setattr(train, "_save", real_save)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt")["step"] == 2
    resumed = distill(config(tiny, tmp_path / "cut", resume=True, **RUNS[method]), progress=False)

    assert resumed["losses"] == whole[0]["losses"] and resumed["held_out"] == whole[0]["held_out"]
    assert resumed["held_out"][-1]["kl"] != resumed["held_out"][0]["kl"]  # the student learned something
    a, b = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (whole[1], tmp_path / "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    states = [torch.load(run / "checkpoint.pt") for run in (whole[1], tmp_path / "cut")]
    for x, y in zip(*(s["optimizer"]["state"].values() for s in states)):
        assert torch.equal(x["exp_avg_sq"], y["exp_avg_sq"])
    assert states[0]["scheduler"] == states[1]["scheduler"]
    assert [s["steps"] for s in resumed["sessions"]] == [2, 2]
    log = json.loads((tmp_path / "cut" / "distill.json").read_text())
    assert log["steps_done"] == 4 and log["tokens_per_s"] > 0 and log["provenance"]["commit"]


def test_adapter_loads_with_peft_and_decodes_through_holokv(tiny, whole, tmp_path):
    log, adapter = whole[0], str(whole[1] / "adapter")
    assert log["data"]["train"]["file"] == tiny[1] and log["data"]["eval_sequences"] == 4
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny[0]), adapter)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # trained, not the init
    use_holokv_attention(model)
    cache = make_cache("holokv", model.config, ratio=2, k=2, prefill="superposed")
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5, do_sample=False,
                         past_key_values=cache, pad_token_id=0)
    assert out.shape == (1, 45) and cache.get_seq_length() == 44 and cache.bytes_per_token() > 0

    def full_ppl(adapter):
        cfg = EvalConfig(model=tiny[0], methods=["holokv:k=2:prefill=superposed"], ratios=[2], context=48,
                         continuation=4, windows=1, tasks=["ppl"], text=tiny[2], adapter=adapter,
                         out=str(tmp_path / f"eval-{adapter is None}"))
        return run_eval(cfg)

    with_adapter, without = full_ppl(adapter), full_ppl(None)
    assert with_adapter["provenance"]["adapter"]["steps_done"] == 4 and without["provenance"]["adapter"] is None
    assert with_adapter["runs"][0]["ppl"] != without["runs"][0]["ppl"]  # merged into the full cache's run too

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "distill.json").write_text((whole[1] / "distill.json").read_text())
    summarize(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["steps"] for r in summary["training"]] == [4]
    assert [(r["adapter"], r["spec"]) for r in summary["evaluation"]] == [
        ("none", "full"), (whole[1].name, "full"), ("none", "holokv:k=2:prefill=superposed"),
        (whole[1].name, "holokv:k=2:prefill=superposed")]
    assert (tmp_path / "summary.png").read_bytes().startswith(b"\x89PNG")  # the training curve and the bars
    (tmp_path / "empty").mkdir()
    summarize(tmp_path / "empty")
    assert not (tmp_path / "empty" / "summary.png").exists()  # nothing to plot


def test_src_adapter_evaluates_with_its_cache_and_pairs_with_it(tiny, trained, tmp_path):
    """holokv eval reads the SRC student's adapter through SRC's cache at its ratio; the report's equal-bytes row
    of that cache holds it as the cache's own adapter, beside the untrained row."""
    log, out = trained("src")
    assert log["config"]["method"] == "src" and log["held_out"][0]["kl"] > 0  # the prompt really is compacted
    shutil.copytree(out, tmp_path / "src-x2")
    for adapter, folder in ((None, "before"), (str(tmp_path / "src-x2" / "adapter"), "src-x2/eval")):
        run_eval(EvalConfig(model=tiny[0], methods=["src"], ratios=[2], context=80, continuation=16, windows=1,
                            tasks=["ppl"], text=tiny[2], adapter=adapter, out=str(tmp_path / folder)))
    summarize(tmp_path)
    rows = {(r["spec"], r["ratio"]): r for r in json.loads((tmp_path / "summary.json").read_text())["equal_bytes"]}
    assert set(rows) == {("full", 1.0), ("src", 2.0)} and rows["src", 2.0]["own"] == "src-x2"
    src, full = rows["src", 2.0], rows["full", 1.0]
    assert src["ppl_own"] != src["ppl"] and src["own_vs_full"] == pytest.approx(src["ppl_own"] / full["ppl"] - 1)


def test_default_text_split_is_disjoint_and_documented():
    from pydoc_data.topics import topics

    train_topics, held_topics = data.topic_split()
    assert not set(train_topics) & set(held_topics) and set(train_topics) | set(held_topics) == set(topics)
    assert data.topic_split() == (train_topics, held_topics)
    train_text, eval_text, info = data.texts(None, None)
    share = len(eval_text) / (len(train_text) + len(eval_text))
    assert 0.2 <= share < 0.3 and info["eval"]["pydoc_topics"] == held_topics
    assert not any(topics[n] in train_text for n in held_topics if len(topics[n]) > 200)


def fail(*args, **kwargs):
    raise AssertionError("model work before the arguments were checked")


@pytest.mark.parametrize("args, names", [
    (["--k", "3"], ["--k/--ratio/--mode", "k (tokens per slot)"]),
    (["--k", "4", "--ratio", "8"], ["--k/--ratio/--mode", "ratios 1..4"]),
    (["--mode", "sideways"], ["--k/--ratio/--mode", "mode"]),
    (["--window-slots", "0"], ["--window-slots"]),
    (["--steps", "0"], ["--steps"]),
    (["--batch", "0"], ["--batch"]),
    (["--seq-len", "1"], ["--seq-len"]),
    (["--lr", "-1"], ["--lr"]),
    (["--lr", "nan"], ["--lr"]),
    (["--temperature", "0"], ["--temperature"]),
    (["--lora-dropout", "1"], ["--lora-dropout"]),
    (["--targets", ","], ["--targets"]),
    (["--dtype", "float16"], ["--dtype"]),
    (["--device", "bogus"], ["--device 'bogus'"]),
    (["--train-text", "missing.txt"], ["--train-text missing.txt", "No such file"]),
    (["--resume"], ["--resume: no checkpoint"]),
    (["--method", "snapkv"], ["--method snapkv needs --ratio"]),
    (["--method", "src", "--ratio", "0.5"], ["--ratio"]),
    (["--method", "src", "--ratio", "2", "--continuation", "0"], ["--continuation"]),
    (["--method", "src", "--ratio", "2", "--continuation", "512"], ["--continuation 512 leaves no prompt"]),
    (["--continuation", "8"], ["--continuation is for", "--method holokv"]),
])
def test_cli_errors_before_model_work(monkeypatch, capsys, tmp_path, args, names):
    monkeypatch.setattr(train, "load_config", fail)
    monkeypatch.setattr(train, "load_model", fail)
    assert main(["distill", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("holokv distill: error: ") and all(n in err for n in names), err


def test_errors_against_the_config_and_the_checkpoint_before_weights(tiny, whole, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(train, "load_model", fail)
    for args, names in [(["--seq-len", "512"], ["--seq-len 512 exceeds the model's 256 positions"]),
                        (["--train-text", tiny[1], "--eval-text", tiny[1]], ["the same file"])]:
        assert main(["distill", "--model", tiny[0], "--out", str(tmp_path), *args]) == 2
        err = capsys.readouterr().err
        assert all(n in err for n in names), err
    with pytest.raises(ValueError, match="holds a checkpoint"):
        distill(config(tiny, whole[1]), progress=False)
    with pytest.raises(ValueError, match=r"--resume: .* --k 2 \(now 4\)"):
        distill(config(tiny, whole[1], k=4, resume=True), progress=False)
    with pytest.raises(ValueError, match="--method must be one of .* got 'h2o'"):  # evicts while decoding
        distill(config(tiny, tmp_path, method="h2o", ratio=2), progress=False)


def test_eval_adapter_must_be_a_peft_folder(monkeypatch, capsys, tmp_path):
    from holokv.eval import runner

    monkeypatch.setattr(runner, "load_config", fail)
    assert main(["eval", "--adapter", str(tmp_path)]) == 2
    assert "--adapter" in capsys.readouterr().err
