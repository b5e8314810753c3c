"""holo_decode, holo_append and append_entries have no derivative: with grad mode on, an input that requires grad
fails at the call and is named, instead of a gradient left None (and a warning) at backward."""
import pytest
import torch

from cases import append_args, decode_args, entries_args

ops = torch.ops.holokv


@pytest.mark.parametrize("name", ["q", "k_slots", "v_slots", "phase", "k_tail", "v_tail", "tail_bias"])
def test_decode_input_requiring_grad_raises(name):
    args = decode_args()
    expected = ops.holo_decode(**args)
    args[name].requires_grad_()
    with pytest.raises(RuntimeError, match=f"holo_decode is not differentiable, but its {name} requires grad"):
        ops.holo_decode(**args)
    with torch.no_grad():
        assert torch.equal(ops.holo_decode(**args), expected)


@pytest.mark.parametrize("name", ["k", "v", "k_slots", "v_tail"])
def test_append_input_requiring_grad_raises(name):
    args = append_args()
    args[name].requires_grad_()
    with pytest.raises(RuntimeError, match=f"holo_append is not differentiable, but its {name} requires grad"):
        ops.holo_append(**args)
    assert args["tail_lens"].tolist() == [0, 0]  # nothing was appended
    with torch.no_grad():
        ops.holo_append(**args)
    assert args["tail_lens"].tolist() == [1, 1]


@pytest.mark.parametrize("name", ["k", "v", "k_cache", "bias"])
def test_entries_input_requiring_grad_raises(name):
    args = entries_args()
    args[name].requires_grad_()
    with pytest.raises(RuntimeError, match=f"append_entries is not differentiable, but its {name} requires grad"):
        torch.ops.holokv.append_entries(**args)
    assert args["lens"].tolist() == [0, 0]  # nothing was appended
    with torch.no_grad():
        torch.ops.holokv.append_entries(**args)
    assert args["lens"].tolist() == [1, 1]
