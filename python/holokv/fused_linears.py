"""The linear layers of a decode step (``Decoder(fuse=True)``): one GEMM for those of a module that read the same
input (the attention's q/k/v projections, the MLP's gate/up), and :func:`holokv.decode_linear.decode_linear` for
the layers alone (the o and down projections, the LM head), which cuBLAS reads furthest from the bandwidth at a
decode step's few rows. (``holokv bench linear`` on an H200: it beats cuBLAS for o, down and the head, not for the
fused q/k/v and gate/up, which stay cuBLAS GEMMs.)

At decode batch sizes a projection is a matrix-vector product bound by its weight's bytes, and each GEMM
launch pays a fixed cost (ramp-up, a split-K reduction) that a small weight does not amortize: Llama-3-8B's
k and v projections are 8 MB each. The members' weights become views of one buffer (rows stacked: no byte is
held twice, the parameters' names and the state dict are unchanged, and a model fused before is not copied
again). While a decode step runs, the first member called computes every member's output in one GEMM and
the others take theirs. A member called on another input (or twice) recomputes, so any call order still gives
each call its own result. A layer alone (o, down, the head) is a group of one.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .decode_linear import linear

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("o_proj",), ("down_proj",), ("lm_head",))


def stacked(parts: list[torch.Tensor]) -> torch.Tensor:
    """The rows of ``parts`` as one tensor: a view where they already lie so in one buffer (a model fused
    before), else a copy."""
    first, offset = parts[0], parts[0].storage_offset()
    adjacent = True
    for t in parts:
        adjacent &= (t.is_contiguous() and t.storage_offset() == offset
                     and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr())
        offset += t.numel()
    rows = sum(t.shape[0] for t in parts)
    return first.as_strided((rows, *first.shape[1:]), first.stride()) if adjacent else torch.cat(parts)


class SharedInput:
    """Members (plain ``nn.Linear`` of one input size, dtype and device, all with a bias or none) of one GEMM."""

    def __init__(self, linears: dict[str, nn.Linear]):
        self.names, self.members = list(linears), list(linears.values())
        self.sizes = [m.out_features for m in self.members]
        self.weight = stacked([m.weight.detach() for m in self.members])
        has_bias = self.members[0].bias is not None
        self.bias = stacked([m.bias.detach() for m in self.members]) if has_bias else None
        for m, w, b in zip(self.members, self.weight.split(self.sizes), self._bias_parts()):
            if m.weight.data_ptr() != w.data_ptr():
                m.weight = nn.Parameter(w, requires_grad=m.weight.requires_grad)
            if b is not None and m.bias.data_ptr() != b.data_ptr():
                m.bias = nn.Parameter(b, requires_grad=m.bias.requires_grad)
        self.source, self.pending = None, {}
        self.gemm = linear if len(self.members) == 1 else F.linear

    def _bias_parts(self):
        return [None] * len(self.sizes) if self.bias is None else self.bias.split(self.sizes)

    def intact(self) -> bool:
        """Whether every member still reads its part of the buffer (not a weight assigned since)."""
        return all(m.weight.data_ptr() == w.data_ptr() and (b is None or m.bias.data_ptr() == b.data_ptr())
                   for m, w, b in zip(self.members, self.weight.split(self.sizes), self._bias_parts()))

    def output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if x is not self.source or name not in self.pending:
            self.pending = dict(zip(self.names, self.gemm(x, self.weight, self.bias).split(self.sizes, -1)))
            self.source = x
        out = self.pending.pop(name)
        if not self.pending:
            self.source = None  # the step's activations are not held past it
        return out


def fusable(module: nn.Module, names: tuple[str, ...]) -> dict[str, nn.Linear] | None:
    linears = {n: getattr(module, n, None) for n in names}
    if not all(type(m) is nn.Linear for m in linears.values()):  # LoRA-wrapped or quantized layers stay as they are
        return None
    first = next(iter(linears.values()))
    same = all(m.in_features == first.in_features and m.weight.dtype == first.weight.dtype
               and m.weight.device == first.weight.device and (m.bias is None) == (first.bias is None)
               for m in linears.values())
    return linears if same else None


class FusedLinears:
    """The model's fusable groups (:data:`GROUPS`), their weights made views of one buffer each at once."""

    def __init__(self, model: nn.Module):
        self.groups = []
        with torch.no_grad():
            for module in model.modules():
                for names in GROUPS:
                    if (linears := fusable(module, names)) is not None:
                        self.groups.append(SharedInput(linears))

    @contextmanager
    def installed(self):
        """Within: each member's forward takes its part of its group's one GEMM (groups whose members were
        given other weights since run as before)."""
        live = [group for group in self.groups if group.intact()]
        for group in live:
            for name, member in zip(group.names, group.members):
                member.forward = lambda x, group=group, name=name: group.output(name, x)
        try:
            yield
        finally:
            for group in live:
                group.source, group.pending = None, {}
                for member in group.members:
                    del member.forward
