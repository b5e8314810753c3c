"""``holokv eval`` rejects bad arguments with ``holokv eval: error: ...`` (exit 2) before it loads anything:
the text, the device and the ratios before the model's config, the methods against the config alone, never
after the weights and tokenizer."""
import pytest
import torch
from transformers import LlamaConfig

from holokv.cli import main
from holokv.eval import runner


def fail(*args, **kwargs):
    raise AssertionError("loaded before the arguments were checked")


@pytest.fixture
def config_only(monkeypatch, tmp_path):
    """A model folder with a config and no weights; loading the model (or its tokenizer) fails the test."""
    LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32).save_pretrained(tmp_path / "model")
    monkeypatch.setattr(runner, "load_model", fail)
    return str(tmp_path / "model")


def run(capsys, model, *args):
    code = main(["eval", "--model", model, *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("holokv eval: error: "), err
    return err


NO_GPU = torch.cuda.device_count() == 0


@pytest.mark.parametrize("args, names", [
    (["--text", "missing.txt"], ["--text missing.txt", "No such file"]),
    (["--device", "bogus"], ["--device 'bogus'"]),
    pytest.param(["--device", "cuda"], ["--device cuda", "0 CUDA GPU"],
                 marks=pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")),
    pytest.param(["--device", "cuda:7"], ["--device cuda:7"],
                 marks=pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has 8 GPUs")),
    (["--ratios", "nan"], ["--ratios", "nan"]),
    (["--ratios", "2,inf"], ["--ratios", "inf"]),
    (["--ratios", "0.5"], ["--ratios must be >= 1"]),
])
def test_checked_before_the_config(monkeypatch, capsys, args, names):
    monkeypatch.setattr(runner, "load_config", fail)
    monkeypatch.setattr(runner, "load_model", fail)
    err = run(capsys, "no-model-needed", *args)
    assert all(n in err for n in names), err


def test_text_folder(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(runner, "load_config", fail)
    assert "--text" in run(capsys, "no-model-needed", "--text", str(tmp_path))


@pytest.mark.parametrize("spec, names", [
    ("holokv:k=0", ["method 'holokv:k=0'", "k (tokens per slot)"]),
    ("h2o:recent=2.0", ["method 'h2o:recent=2.0'", "recent must be"]),
    ("snapkv:window=0", ["window must be"]),
    ("streaming:sinks=-5", ["sinks must be"]),
    ("holokv:colour=red", ["holokv has no option colour"]),
    ("holokv:k", ["not key=value"]),
    ("nope", ["unknown method"]),
])
def test_methods_checked_against_the_config_only(config_only, capsys, spec, names):
    err = run(capsys, config_only, "--methods", spec)
    assert all(n in err for n in names), err
