"""The storage every cache layer holds: growth keeps what is held (a wrapped ring is unrolled), appends write in
place after each sequence's (or head's) last entry, and the bytes held count what is in use."""
import pytest
import torch

import holokv
from holokv.caches.store import BLOCK, Store


def filled(phase=None, per_head=False, bias=False, B=2, H=2, d=16):
    like = torch.zeros(B, H, 0, d, dtype=torch.float64)
    s = Store(like, phase=phase, per_head=per_head, bias=bias)
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(B, H, 40, d, generator=g, dtype=torch.float64) for _ in range(2))
    lens = torch.tensor([[40, 31], [12, 25]]) if per_head else torch.tensor([40, 17])
    s.write(k, v, lens, torch.randn(B, H, 40, generator=g, dtype=torch.float64) if bias else None)
    return s


def test_growth_unrolls_a_wrapped_ring():
    s = filled(phase=holokv.phase_keys(4, 16, dtype=torch.float64))
    T = s.capacity
    s.start.copy_(torch.tensor([T - 5, 3]))  # the first sequence's ring wraps past the end
    q = torch.randn(2, 4, 16, dtype=torch.float64)
    before = s.decode(q, 0.25)
    s.reserve(T + 1)
    assert s.capacity == 2 * T and s.start.tolist() == [0, 0]
    torch.testing.assert_close(s.decode(q, 0.25), before, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("per_head", [False, True])
def test_append_writes_after_the_last_entry(per_head):
    s = filled(per_head=per_head, bias=True)
    lens = s.lens.clone()
    k, v = torch.randn(2, 2, 16, dtype=torch.float64), torch.randn(2, 2, 16, dtype=torch.float64)
    s.append(k, v)
    assert torch.equal(s.lens, lens + 1)
    for b in range(2):
        for h in range(2):
            row = int((lens[b, h] if per_head else lens[b]))
            assert torch.equal(s.k[b, h, row], k[b, h]) and torch.equal(s.v[b, h, row], v[b, h])
            assert s.bias[b, h, row] == 0


def test_growth_is_geometric_in_blocks_unless_exact():
    s = filled()
    cap = s.capacity
    assert cap % BLOCK == 0
    s.reserve(cap + 1)
    assert s.capacity == 2 * cap
    s.reserve(s.capacity + 1, exact=True)
    assert s.capacity == 2 * cap + BLOCK


def test_bytes_held_count_entries_in_use():
    per_head = filled(per_head=True, bias=True)
    assert per_head.nbytes() == (40 + 31 + 12 + 25) * (2 * 16 + 1) * 8
    per_seq = filled()
    assert per_seq.nbytes() == (40 + 17) * 2 * 2 * 16 * 8
    per_seq.reserve(1000)
    assert per_seq.nbytes() == (40 + 17) * 2 * 2 * 16 * 8  # capacity is not held data
