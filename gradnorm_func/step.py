"""One whole GradNorm step: L_grad, its gradient with respect to the weights, the update."""

from __future__ import annotations

from torch import Tensor

from gradnorm_func.norms import LossesFn, Params, task_gradient_norms
from gradnorm_func.objective import GradNormAux, loss_grad_gradient
from gradnorm_func.state import GradNormState
from gradnorm_func.update import update


def step_from_norms(
    state: GradNormState, task_losses: Tensor, grad_norms: Tensor
) -> tuple[GradNormState, GradNormAux]:
    """``update(state, dL_grad/dw)`` given per-task losses and unweighted gradient norms.

    This is the entry point for callers that already have ||grad_W L_i||, e.g. from the
    forward/backward pass of their own train step (:mod:`gradnorm_func.fork`). The gradient
    dL_grad/dw_i = sign(G_i - target_i) ||grad_W L_i|| is formed directly
    (:func:`loss_grad_gradient`), which is what autograd of :func:`gradnorm_loss_from_norms`
    gives, without the cost of a ``torch.func.grad`` transform.
    """
    grads, aux = loss_grad_gradient(state, task_losses, grad_norms)
    return update(state, grads, aux=aux), aux


def step(state: GradNormState, params: Params, losses: LossesFn) -> tuple[GradNormState, GradNormAux]:
    """One GradNorm step (Chen et al. 2018, Algorithm 1) at the shared parameters ``params``.

    Composes :func:`gradnorm_loss` and :func:`update`: the per-task norms come from one
    batched pass, L_grad is differentiated with respect to the weights only, and the new
    weights are floored and renormalised to sum T. The model's own update must use
    ``state.weights`` from *before* this call, as Algorithm 1 does.

    Args:
        state: current state.
        params: pytree of the shared tensors W.
        losses: maps ``params`` to the Tensor[T] of per-task losses.

    Returns:
        ``(new_state, aux)``; ``aux.finite`` is False when the update was skipped.
    """
    task_losses, norms = task_gradient_norms(params, losses, num_tasks=state.weights.shape[0])
    return step_from_norms(state, task_losses, norms)
