import pytest
import torch
from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb as rope_interleaved
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as rope_half

import holokv
from holokv.reference import phase_keys_ref

KS = [1, 2, 4, 8, 16]


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("k", KS)
def test_orthogonal_pm1_deterministic(k, d, layout):
    phi = holokv.phase_keys(k, d, layout)
    assert phi.shape == (k, d) and phi.dtype == torch.float32
    assert set(phi.unique().tolist()) <= {-1.0, 1.0}
    torch.testing.assert_close(phi @ phi.T, d * torch.eye(k), rtol=0, atol=0)
    assert torch.equal(phi, holokv.phase_keys(k, d, layout))
    assert torch.equal(phi, phase_keys_ref(k, d, layout))


@pytest.mark.parametrize("k", KS)
def test_even_boundary_rule(k):
    d = 64
    half, inter = holokv.phase_keys(k, d, "half"), holokv.phase_keys(k, d, "interleaved")
    assert torch.equal(half[:, : d // 2], half[:, d // 2:])
    assert torch.equal(inter[:, 0::2], inter[:, 1::2])
    if k > 1:  # the two layouts differ, so the rule is not met by accident
        assert not torch.equal(half, inter)


def _cos_sin(n, d, interleaved):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv  # [n, d/2]
    if interleaved:
        return ang.cos()[None], ang.sin()[None]
    return torch.cat([ang, ang], -1).cos()[None], torch.cat([ang, ang], -1).sin()[None]


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rope_commutes_with_phase_keys(k, layout):
    """RoPE(x * Phi_j) == RoPE(x) * Phi_j, using transformers' own rotary functions."""
    n, d = 7, 64
    x = torch.randn(1, 2, n, d, dtype=torch.float64)
    for j, phi in enumerate(holokv.phase_keys(k, d, layout, dtype=torch.float64)):
        if layout == "half":
            cos, sin = _cos_sin(n, d, False)
            rope = lambda t: rope_half(t, t, cos, sin)[0]  # noqa: E731
        else:
            cos, sin = _cos_sin(n, d, True)
            rope = lambda t: rope_interleaved(t.transpose(1, 2), sin, cos).transpose(1, 2)  # noqa: E731
        torch.testing.assert_close(rope(x * phi), rope(x) * phi, rtol=1e-12, atol=1e-12)
    # a key that gives dimension 0 a sign of its own breaks commutation: the test can fail
    broken = phi.clone()
    broken[0] = -broken[0]
    assert not torch.allclose(rope(x * broken), rope(x) * broken)


@pytest.mark.parametrize("bad, match", [
    ((3, 64, "half"), "power of two"), ((32, 64, "half"), "power of two"), ((4, 62, "half"), "head_dim"),
    ((4, 64, "neox"), "rope_layout"), ((16, 16, "half"), "head_dim"),
])
def test_bad_arguments(bad, match):
    with pytest.raises(RuntimeError, match=match):
        holokv.phase_keys(*bad)
