"""Fused linears (holokv.fused_linears): a model's q/k/v and gate/up weights become views of one buffer each,
without a byte held twice; while installed, every call gets what its own layer computes, in the model's order
or any other, and the model is as before once they are removed."""
import torch
from torch import nn

from holokv.fused_linears import FusedLinears

from conftest import tiny_llama


def storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_weights_become_views_of_one_buffer():
    model = tiny_llama()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    fused = FusedLinears(model)
    assert len(fused.groups) == 4 * model.config.num_hidden_layers + 1  # q/k/v, gate/up, o, down; the head
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        assert storage(a.q_proj.weight) == storage(a.k_proj.weight) == storage(a.v_proj.weight)
        assert storage(m.gate_proj.weight) == storage(m.up_proj.weight) != storage(a.q_proj.weight)
        assert a.k_proj.weight.data_ptr() == a.q_proj.weight.data_ptr() + a.q_proj.weight.nbytes
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[n], p) for n, p in before.items())
    # a model fused before is not copied again
    pointers = [p.data_ptr() for p in model.parameters()]
    FusedLinears(model)
    assert [p.data_ptr() for p in model.parameters()] == pointers


def test_installed_forward_matches_the_model():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        fused = FusedLinears(model)
        with fused.installed():
            got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not any("forward" in vars(m) for m in model.modules())


def test_any_call_order_and_input():
    """Members called out of order, twice, or on different inputs still return their own layer's output."""
    torch.manual_seed(0)
    block = nn.Module()
    block.q_proj, block.k_proj, block.v_proj = nn.Linear(8, 6), nn.Linear(8, 4), nn.Linear(8, 4)
    plain = {n: nn.Linear(8, m.out_features) for n, m in block.named_children()}
    for n, m in plain.items():
        m.load_state_dict(getattr(block, n).state_dict())
    fused = FusedLinears(block)
    x, y = torch.randn(2, 3, 8)
    calls = [("v_proj", x), ("q_proj", x), ("q_proj", x), ("k_proj", y), ("v_proj", x), ("k_proj", x)]
    with torch.no_grad(), fused.installed():
        for name, inp in calls:
            torch.testing.assert_close(getattr(block, name)(inp), plain[name](inp))


def test_a_group_given_new_weights_runs_unfused():
    model = tiny_llama(layers=1)
    fused = FusedLinears(model)
    attn = model.model.layers[0].self_attn
    attn.k_proj.weight = nn.Parameter(torch.randn_like(attn.k_proj.weight))
    x = torch.randn(3, model.config.hidden_size)
    with torch.no_grad(), fused.installed():
        assert "forward" not in vars(attn.k_proj)
        torch.testing.assert_close(attn.k_proj(x), x @ attn.k_proj.weight.T)
        assert "forward" in vars(model.model.layers[0].mlp.up_proj)
