"""Layer-adaptive budgets (PyramidKV): lower layers keep more, the cache's total stays the uniform one's, never
more than every token per layer; the option is checked by name."""
import pytest
import torch

from holokv.caches import make_cache
from holokv.caches.hf_attention import CACHE_KWARG
from holokv.caches.layer_budgets import layer_ratios
from conftest import tiny_llama

METHODS = ["streaming", "snapkv", "tova", "src"]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=6, head_dim=16)


def test_ratios_fall_linearly_around_the_mean_budget():
    ratios = layer_ratios(4.0, 5, 3.0)
    shares = [4.0 / r for r in ratios]  # each layer's budget over the mean
    assert shares == pytest.approx([5 / 3, 4 / 3, 1, 2 / 3, 1 / 3])
    assert layer_ratios(4.0, 5, 1.0) == [4.0] * 5 == layer_ratios(4.0, 5, None)
    assert layer_ratios(1.5, 3, 10.0)[0] == 1.0  # a share past every token stops at every token


def held_per_layer(model, method, **options):
    ids = torch.randint(0, 128, (1, 240), generator=torch.Generator().manual_seed(3))
    cache = make_cache(method, model.config, ratio=4, **options)
    with torch.no_grad():
        model(ids, **{CACHE_KWARG: cache})
    return [layer.nbytes() for layer in cache.layers]


@pytest.mark.parametrize("method", METHODS)
def test_lower_layers_keep_more_and_the_total_stays(model, method):
    options = dict(window=4) if method == "src" else {}
    uniform = held_per_layer(model, method, **options)
    pyramid = held_per_layer(model, method, pyramid=4.0, **options)
    assert pyramid == sorted(pyramid, reverse=True) and pyramid[0] > 2 * pyramid[-1]
    assert sum(pyramid) == pytest.approx(sum(uniform), rel=0.05)
    assert held_per_layer(model, method, pyramid=1.0, **options) == uniform


@pytest.mark.parametrize("value", [0.5, float("nan"), "wide"])
def test_pyramid_is_checked_by_name(model, value):
    with pytest.raises(ValueError, match="pyramid"):
        make_cache("snapkv", model.config, ratio=4, pyramid=value)
    with pytest.raises(ValueError, match="pyramid"):
        make_cache("holokv", model.config, ratio=4, pyramid=2.0)  # HoloKV's budget is its k
