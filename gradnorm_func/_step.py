"""One whole GradNorm step, from the shared parameters, the per-task gradients or their norms."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from gradnorm_func._gradients import global_norms, task_gradients
from gradnorm_func._objective import GradNormAux, gradnorm_statistics
from gradnorm_func._state import GradNormState
from gradnorm_func._types import BatchSize, LossesFn, Params
from gradnorm_func._update import update


def step_from_norms(state: GradNormState, task_losses: Tensor, grad_norms: Tensor
                    ) -> tuple[GradNormState, GradNormAux]:
    """One GradNorm update from this step's losses L_i and norms n_i = ||grad_W L_i||.

    ``update(state, dL_grad/dw, aux=aux)`` with dL_grad/dw_i = sign(G_i - target_i) n_i
    formed directly (:func:`gradnorm_statistics`), which is what autograd of
    :func:`gradnorm_loss` gives, without the cost of a ``torch.func.grad`` transform.
    Bad inputs skip the update; see :func:`update`.

    Args:
        state: current state.
        task_losses: Tensor[T] of L_i(t) (any float dtype; cast to the state's).
        grad_norms: Tensor[T] of ||grad_W L_i(t)||_2.

    Returns:
        ``(new_state, aux)``.
    """
    aux, grads = gradnorm_statistics(state, task_losses, grad_norms)
    return update(state, grads, aux=aux), aux


def step_from_gradients(state: GradNormState, task_losses: Tensor, task_grads: Params, *,
                        process_group: dist.ProcessGroup | None = None,
                        batch_size: BatchSize = None) -> tuple[GradNormState, GradNormAux]:
    """One GradNorm update from this step's losses and per-task gradients at W.

    ``task_grads`` is a pytree whose leaves carry a leading task axis, grad_W L_i for every
    i, as :func:`task_gradients` or :func:`fork_gradients` return it. Under gradient
    accumulation, pass the mean over the micro-batches of both the losses and the
    gradients: the update then equals that of the full batch.

    Args:
        state: current state.
        task_losses: Tensor[T] of L_i(t).
        task_grads: pytree of [T, *W.shape] tensors.
        process_group: average the gradients and losses over this group's ranks first
            (one all-reduce), so that every rank takes the global-batch step.
        batch_size: this rank's local batch size n_r when ranks' batches differ in size.
    """
    task_losses, norms = global_norms(task_losses, task_grads, process_group=process_group,
                                      batch_size=batch_size)
    return step_from_norms(state, task_losses, norms)


def step(state: GradNormState, params: Params, losses_fn: LossesFn, *,
         process_group: dist.ProcessGroup | None = None,
         batch_size: BatchSize = None) -> tuple[GradNormState, GradNormAux]:
    """One GradNorm step (Chen et al. 2018, Algorithm 1) at the shared parameters ``params``.

    The per-task gradients come from one batched pass (:func:`task_gradients`), the
    gradient of L_grad with respect to the weights is formed in closed form
    (:func:`step_from_norms`), and the new weights are floored and renormalised. The model's
    own update must use ``state.weights`` from *before* this call, as Algorithm 1 does.

    Args:
        state: current state.
        params: pytree of the shared tensors W.
        losses_fn: maps ``params`` to the Tensor[T] of per-task losses.
        process_group: a ``torch.distributed`` group to synchronise over: the norms and
            losses are those of the global batch (g_i = sum_r n_r g_i^(r) / sum_r n_r), so
            every rank computes the same new state. One all-reduce of
            T (numel(W) + 1) + 1 elements; it compiles (functional collectives). Call
            :func:`check_same_tasks` once beforehand.
        batch_size: this rank's local batch size n_r when ranks' batches differ in size;
            None weights the ranks equally.

    Returns:
        ``(new_state, aux)``; ``new_state.skipped`` is True when the update was skipped (on
        all ranks alike: a NaN on one rank reaches every rank through the all-reduce).
    """
    task_losses, task_grads = task_gradients(params, losses_fn, num_tasks=state.weights.shape[0])
    return step_from_gradients(state, task_losses, task_grads, process_group=process_group,
                               batch_size=batch_size)
