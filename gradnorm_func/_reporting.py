"""Telling the user about skipped updates: a warning in eager code, never a sync in a graph."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from gradnorm_func._host import readable
from gradnorm_func._objective import GradNormAux
from gradnorm_func._state import GradNormState


class SkippedUpdateWarning(UserWarning):
    """GradNorm skipped a weight update because an input or its result was bad."""


def skip_summary(state: GradNormState, aux: GradNormAux) -> Tensor:
    """What a skip message needs, as one float64 vector (one copy to the host):
    [skipped, skipped_count, update_count, L_grad, largest number of the state's dtype,
    valid_losses (T), valid_norms (T), losses (T), norms (T)]."""
    largest = torch.full_like(aux.loss_grad, torch.finfo(state.weights.dtype).max).double()
    head = torch.stack([state.skipped.double(), state.skipped_count.double(),
                        state.update_count.double(), aux.loss_grad.double(), largest])
    return torch.cat([head, aux.valid_losses.double(), aux.valid_norms.double(),
                      aux.task_losses.double(), aux.grad_norms.double()])


def skip_message(summary: Tensor) -> str | None:
    """The warning for a :func:`skip_summary` read on the host, or None when the update was
    applied or this skip need not be announced (only the 1st, 2nd, 4th, 8th, ... is)."""
    values = summary.tolist()
    skipped, skipped_count, applied, loss_grad, largest = values[:5]
    num_tasks = (len(values) - 5) // 4
    valid_losses, valid_norms, losses, norms = (
        values[5 + k * num_tasks: 5 + (k + 1) * num_tasks] for k in range(4))
    count = int(skipped_count)
    if not skipped or count & (count - 1):
        return None
    reasons = []
    bad_losses = [i for i, ok in enumerate(valid_losses) if not ok]
    bad_norms = [i for i, ok in enumerate(valid_norms) if not ok]
    if bad_losses:
        reasons.append(f"the loss of task(s) {bad_losses} is not finite and positive "
                       f"({[losses[i] for i in bad_losses]}); the ratio L_i/L_i(0) needs "
                       "positive losses")
    if bad_norms:
        zero = [i for i in bad_norms if norms[i] == 0]
        reasons.append(f"the gradient norm at W of task(s) {bad_norms} is not finite and "
                       f"positive ({[norms[i] for i in bad_norms]})" + (
                           f"; a zero norm means W is not shared by task(s) {zero} (pass the "
                           "last layer that every task uses)" if zero else ""))
    if not reasons and max(norms) ** 2 > largest:
        reasons.append(f"the squared gradient norms (up to {max(norms) ** 2:.3g}) overflow the "
                       "state's dtype in Adam's second moment: pass dtype=torch.float64")
    if not reasons:
        reasons.append(f"the new weights were not finite, positive normal numbers (L_grad = "
                       f"{loss_grad}): lower lr or alpha, or raise min_weight")
    return (f"GradNorm skipped a weight update ({count} skipped, {int(applied)} applied so "
            f"far): {'; '.join(reasons)}. The weights keep their values; state.skipped and "
            "state.skipped_count record every skip.")


def warn_if_skipped(state: GradNormState, aux: GradNormAux) -> None:
    """Warns (:class:`SkippedUpdateWarning`) about a skipped update in eager CPU code.

    Anywhere else reading the flag would sync the device or break the graph, so only
    ``state.skipped`` and ``state.skipped_count`` report it there (the stateful ``GradNorm``
    reads them later without a sync and warns on CUDA too).
    """
    if readable(state.skipped) and bool(state.skipped):
        message = skip_message(skip_summary(state, aux))
        if message is not None:
            warnings.warn(message, SkippedUpdateWarning, stacklevel=3)
