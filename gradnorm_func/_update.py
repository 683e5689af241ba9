"""The task-weight update: SGD or Adam, a positive floor, then sum S; a bad step is skipped."""

from __future__ import annotations

import torch
from torch import Tensor

from gradnorm_func._checks import check_task_vector
from gradnorm_func._objective import GradNormAux
from gradnorm_func._reporting import warn_if_skipped
from gradnorm_func._state import GradNormState


def update(state: GradNormState, grads: Tensor, *, aux: GradNormAux | None = None
           ) -> GradNormState:
    """Applies one step to the task weights and returns the new state.

    With t the update count, lr_t = lr * min(1, t / warmup_steps) and S = hyper.weight_sum::

        SGD:  w' = w - lr_t * g
        Adam: w' = w - lr_t * mhat_t / (sqrt(vhat_t) + eps)
        then  w'' = max(w', min_weight),  w(t+1) = S * w'' / sum_j w''_j

    so every weight is positive and they sum to S (T by default). The first applied update
    records L_i(0) from ``aux``.

    The update is **skipped** (weights, moments, L_i(0) and the update count unchanged,
    ``skipped`` set and ``skipped_count`` incremented) when any task's loss or gradient norm
    is not finite and positive (``aux.valid_losses``, ``aux.valid_norms``), when L_grad or
    ``grads`` are not finite, or when the new weights would not be finite, positive normal
    numbers or the second moments (g^2) would overflow the state's dtype. All of it is
    decided in the graph, without reading a value; in eager CPU code a
    :class:`SkippedUpdateWarning` says so (on the 1st, 2nd, 4th, ... skip).
    Pure: ``state`` is not modified and the result has no autograd history.

    Args:
        state: current state.
        grads: Tensor[T], dL_grad/dw at ``state.weights``.
        aux: this step's statistics, from :func:`gradnorm_loss`. Required: it carries the
            losses that become L_i(0) and the checks that decide whether the step applies.

    Raises:
        TypeError: ``aux`` is missing.
    """
    if aux is None:
        raise TypeError("update needs the aux that gradnorm_loss returned for this step: "
                        "state = update(state, grads, aux=aux). It records L_i(0) on the first "
                        "step and carries the checks that skip a bad step; without it every "
                        "step would take its own losses as L_i(0) and alpha would do nothing")
    hyper = state.hyper
    with torch.no_grad():  # everything below is a constant: no history, no detach needed
        weights = state.weights
        grads = check_task_vector("grads", grads, weights.shape[0]).to(weights.dtype)
        t = (state.update_count + 1).to(weights.dtype)
        lr = hyper.lr * torch.clamp(t / hyper.warmup_steps, max=1.0)  # t / 0 = inf: no ramp
        exp_avg = torch.lerp(state.exp_avg, grads, 1 - hyper.beta1)
        exp_avg_sq = torch.lerp(state.exp_avg_sq, grads * grads, 1 - hyper.beta2)
        adam_direction = (exp_avg / (1 - hyper.beta1 ** t)) / (
            (exp_avg_sq / (1 - hyper.beta2 ** t)).sqrt() + hyper.eps)
        direction = torch.where(hyper.use_adam, adam_direction, grads)
        new_weights = torch.clamp(weights - lr * direction, min=hyper.min_weight)
        new_weights = new_weights * (hyper.weight_sum / new_weights.sum())
        # Applied iff every loss, norm and new weight is a finite, positive normal number (a
        # subnormal weight would lose digits when cotangents are divided by it), and L_grad and
        # the second moments are finite: NaN fails every comparison.
        lowest, highest = torch.aminmax(torch.cat([aux.task_losses, aux.grad_norms, new_weights]))
        applied = ((lowest >= torch.finfo(weights.dtype).tiny)
                   & (highest + aux.loss_grad + torch.where(hyper.use_adam, exp_avg_sq.sum(), 0.0)
                      < torch.inf))
        skipped = ~applied
        keep_moments = applied & hyper.use_adam  # under SGD the moments stay zero
        new_state = GradNormState(
            weights=torch.where(applied, new_weights, weights),
            initial_losses=torch.where(applied, aux.initial_losses, state.initial_losses),
            update_count=state.update_count + applied,
            skipped_count=state.skipped_count + skipped,
            skipped=skipped,
            exp_avg=torch.where(keep_moments, exp_avg, state.exp_avg),
            exp_avg_sq=torch.where(keep_moments, exp_avg_sq, state.exp_avg_sq),
            hyper=hyper,
        )
    warn_if_skipped(new_state, aux)
    return new_state
