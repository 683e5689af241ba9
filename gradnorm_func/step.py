"""One whole GradNorm step: L_grad, its gradient with respect to the weights, the update."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from gradnorm_func.distributed import BatchSize
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


def step(state: GradNormState, params: Params, losses: LossesFn, *,
         process_group: dist.ProcessGroup | None = None,
         batch_size: BatchSize = None) -> tuple[GradNormState, GradNormAux]:
    """One GradNorm step (Chen et al. 2018, Algorithm 1) at the shared parameters ``params``.

    Composes :func:`gradnorm_loss` and :func:`update`: the per-task norms come from one
    batched pass, L_grad is differentiated with respect to the weights only, and the new
    weights are floored and renormalised to sum T. The model's own update must use
    ``state.weights`` from *before* this call, as Algorithm 1 does.

    Args:
        state: current state.
        params: pytree of the shared tensors W.
        losses: maps ``params`` to the Tensor[T] of per-task losses.
        process_group: a ``torch.distributed`` group to synchronise over: the norms and
            losses are those of the global batch (g_i = sum_r n_r g_i^(r) / sum_r n_r), so
            every rank computes the same new state. One all-reduce of
            T (numel(W) + 1) + 1 elements; it compiles (functional collectives). Call
            :func:`~gradnorm_func.distributed.check_same_tasks` once beforehand.
        batch_size: this rank's local batch size n_r when ranks' batches differ in size;
            None weights the ranks equally.

    Returns:
        ``(new_state, aux)``; ``aux.finite`` is False when the update was skipped (on all
        ranks alike: a NaN on one rank reaches every rank through the all-reduce).
    """
    task_losses, norms = task_gradient_norms(params, losses, num_tasks=state.weights.shape[0],
                                             process_group=process_group, batch_size=batch_size)
    return step_from_norms(state, task_losses, norms)
