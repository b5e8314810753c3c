"""Autograd of superpose: it is linear, and its adjoint demodulates each slot
back to its k tokens, ``dx[s*k + t] = dslot_s * Phi_t / sqrt(k)``. This is what
LoRA distillation through a superposed cache differentiates."""
import math

import torch

from .reference import demodulate_ref


def _setup(ctx, inputs, output):
    x, phase = inputs
    ctx.save_for_backward(phase)
    ctx.n_tokens = x.shape[2]


def _backward(ctx, grad):
    (phase,) = ctx.saved_tensors
    grad_x = demodulate_ref(grad, phase, ctx.n_tokens) / math.sqrt(phase.shape[0])
    return grad_x, None


torch.library.register_autograd("holokv::superpose", _backward, setup_context=_setup)
