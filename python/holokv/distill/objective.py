"""The distillation objective and its held-out measures: teacher and student read the same tokens in the
same step, the teacher with the adapters disabled, exact attention and no gradient."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .student import attending


def kl_sum(teacher_logits, student_logits, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) between the next-token distributions at ``temperature``, summed over positions."""
    t = F.log_softmax(teacher_logits.float().flatten(0, -2) / temperature, -1)
    s = F.log_softmax(student_logits.float().flatten(0, -2) / temperature, -1)
    return F.kl_div(s, t, log_target=True, reduction="sum")


def _pair(model, ids, read, record: bool):
    """(teacher logits, student logits, teacher's and student's per-layer attention outputs if ``record``)."""
    with torch.no_grad(), model.disable_adapter(), attending(None, record) as teacher_out:
        teacher = model(input_ids=ids, use_cache=False).logits
    with attending(read, record) as student_out:
        student = model(input_ids=ids, use_cache=False).logits
    return teacher, student, teacher_out, student_out


def loss(model, ids, read, temperature: float, mse_weight: float, first: int = 0) -> tuple[torch.Tensor, dict]:
    """(the loss to minimize, its parts as tensors): the mean KL per position from ``first`` on (the positions
    scored: DistillConfig.first_scored), scaled by T^2 so that the gradients keep their size across
    temperatures, plus ``mse_weight`` times the attention outputs' MSE at those positions (each layer's output
    against the teacher's, averaged over layers)."""
    teacher, student, teacher_out, student_out = _pair(model, ids, read, mse_weight > 0)
    kl = kl_sum(teacher[:, first:], student[:, first:], temperature) / ids[:, first:].numel() * temperature ** 2
    if mse_weight == 0:
        return kl, dict(kl=kl)
    mse = torch.stack([F.mse_loss(s[:, first:].float(), t[:, first:].float())
                       for s, t in zip(student_out, teacher_out)]).mean()
    return kl + mse_weight * mse, dict(kl=kl, mse=mse)


@torch.no_grad()
def held_out(model, seqs: torch.Tensor, read, batch: int, device, first: int = 0) -> dict:
    """Over the held-out sequences, from position ``first`` on (as :func:`loss`): the student's KL from the
    teacher per position (T=1) and both perplexities of the next tokens."""
    kl = nll_student = nll_teacher = 0.0
    for chunk in seqs.split(batch):
        ids = chunk.to(device)
        teacher, student, _, _ = _pair(model, ids, read, False)
        kl += kl_sum(teacher[:, first:], student[:, first:]).item()
        target = ids[:, first + 1:].flatten()
        nll_student += F.cross_entropy(student[:, first:-1].flatten(0, 1).float(), target, reduction="sum").item()
        nll_teacher += F.cross_entropy(teacher[:, first:-1].flatten(0, 1).float(), target, reduction="sum").item()
    predicted = seqs.shape[0] * (seqs.shape[1] - 1 - first)
    return dict(kl=kl / seqs[:, first:].numel(), ppl=math.exp(nll_student / predicted),
                ppl_teacher=math.exp(nll_teacher / predicted))
