"""The task-weight update: SGD or Adam with warm-up, a positive floor, then sum to T."""

from __future__ import annotations

import torch
from torch import Tensor

from gradnorm_func.objective import GradNormAux
from gradnorm_func.state import GradNormState


def update(state: GradNormState, grads: Tensor, *, aux: GradNormAux | None = None) -> GradNormState:
    """Applies one step to the task weights and returns the new state.

    With t the update count and lr_t = lr * min(1, t / warmup_steps)::

        SGD:  w' = w - lr_t * g
        Adam: w' = w - lr_t * mhat_t / (sqrt(vhat_t) + eps)
        then  w'' = max(w', min_weight),  w(t+1) = T * w'' / sum_j w''_j

    so every weight is positive and they sum to T. If ``grads`` (or, when ``aux`` is given,
    the losses or norms behind them) are not all finite, the weights, moments and count are
    returned unchanged. Pure: ``state`` is not modified and the result has no autograd history.

    Args:
        state: current state.
        grads: Tensor[T], dL_grad/dw at ``state.weights``.
        aux: this step's auxiliary output from :func:`gradnorm_loss`. Pass it so that the
            first step records L_i(0) and non-finite losses skip the update.
    """
    hyper = state.hyper
    dtype = state.weights.dtype
    num_tasks = state.weights.shape[0]
    grads = grads.detach().to(dtype)
    if grads.shape != (num_tasks,):
        raise ValueError(f"grads must have shape ({num_tasks},), got {tuple(grads.shape)}")
    finite = torch.isfinite(grads).all()
    if aux is not None:
        finite = finite & aux.finite

    count = state.update_count + 1
    t = count.to(dtype)
    lr = hyper.lr * torch.clamp(t / torch.clamp(hyper.warmup_steps, min=1.0), max=1.0)
    exp_avg = torch.lerp(state.exp_avg, grads, 1 - hyper.beta1)
    exp_avg_sq = torch.lerp(state.exp_avg_sq, grads.square(), 1 - hyper.beta2)
    adam_direction = (exp_avg / (1 - hyper.beta1.pow(t))) / (
        (exp_avg_sq / (1 - hyper.beta2.pow(t))).sqrt() + hyper.eps
    )
    direction = torch.where(hyper.use_adam, adam_direction, grads)
    weights = torch.clamp(state.weights.detach() - lr * direction, min=hyper.min_weight)
    weights = weights * (num_tasks / weights.sum())
    # Under SGD, and on a skipped step, the moments stay as they were.
    keep_moments = finite & hyper.use_adam

    initial = state.initial_losses if aux is None else aux.initial_losses
    return GradNormState(
        hyper=hyper,
        weights=torch.where(finite, weights, state.weights).detach(),
        initial_losses=torch.where(finite, initial, state.initial_losses).detach(),
        update_count=torch.where(finite, count, state.update_count),
        exp_avg=torch.where(keep_moments, exp_avg, state.exp_avg).detach(),
        exp_avg_sq=torch.where(keep_moments, exp_avg_sq, state.exp_avg_sq).detach(),
    )
