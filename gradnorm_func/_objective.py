"""The GradNorm loss L_grad of Chen et al. (2018), Algorithm 1, and what it is made of."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from gradnorm_func._checks import check_state_dtype, check_task_vector
from gradnorm_func._gradients import global_norms, task_gradients
from gradnorm_func._state import GradNormState
from gradnorm_func._types import BatchSize, LossesFn, Params


class GradNormAux(NamedTuple):
    """What one GradNorm step saw, for logging and for :func:`update`. All detached."""

    task_losses: Tensor  # [T] L_i(t), in the state's dtype
    grad_norms: Tensor  # [T] ||grad_W L_i(t)||_2, unweighted
    weighted_norms: Tensor  # [T] G_i(t) = w_i(t) ||grad_W L_i(t)||_2
    targets: Tensor  # [T] Gbar(t) r_i(t)^alpha, held constant
    loss_ratios: Tensor  # [T] r_i(t) = Ltilde_i(t) / mean_j Ltilde_j(t)
    loss_grad: Tensor  # [] L_grad(t) = sum_i |G_i(t) - target_i(t)|
    initial_losses: Tensor  # [T] L_i(0) in use: the recorded ones, else this step's losses

    @property
    def valid_losses(self) -> Tensor:
        """[T] bool: L_i(t) finite and positive, as the ratio L_i / L_i(0) needs."""
        return torch.isfinite(self.task_losses) & (self.task_losses > 0)

    @property
    def valid_norms(self) -> Tensor:
        """[T] bool: ||grad_W L_i(t)|| finite and positive; zero means W is not shared by task i."""
        return torch.isfinite(self.grad_norms) & (self.grad_norms > 0)


def gradnorm_statistics(state: GradNormState, task_losses: Tensor, grad_norms: Tensor
                        ) -> tuple[GradNormAux, Tensor]:
    """The quantities of Chen et al. (2018), Eq. 1-2, and dL_grad/dw, without autograd.

    With n_i = ||grad_W L_i||, G_i = w_i n_i, Gbar = mean_i G_i, Ltilde_i = L_i / L_i(0) and
    r_i = Ltilde_i / mean_j Ltilde_j, the loss L_grad = sum_i |G_i - stopgrad(Gbar r_i^alpha)|
    has, with the target held constant, the gradient dL_grad/dw_i = sign(G_i - target_i) n_i.
    That is what autograd gives for :func:`gradnorm_loss`, at a fraction of the cost.

    The ratio L_i / L_i(0) is defined for positive losses, and a task whose gradient at W is
    zero does not share W: :func:`update` skips a step where any loss or norm is not finite
    and positive (``aux.valid_losses``, ``aux.valid_norms`` say which).

    Returns:
        ``(aux, grads)``: every statistic, detached, and dL_grad/dw, Tensor[T].
    """
    num_tasks = state.weights.shape[0]
    check_task_vector("task_losses", task_losses, num_tasks)
    check_task_vector("grad_norms", grad_norms, num_tasks)
    dtype = check_state_dtype("the state's dtype (state.weights.dtype)", state.weights.dtype)
    with torch.no_grad():  # the targets are constants; only loss_grad_from tracks the weights
        losses = task_losses.detach().to(dtype)
        norms = grad_norms.detach().to(dtype)
        initial = torch.where(torch.isnan(state.initial_losses), losses, state.initial_losses)
        inverse_rates = losses / initial
        ratios = inverse_rates / inverse_rates.mean()
        weighted = state.weights * norms
        targets = weighted.mean() * ratios.pow(state.hyper.alpha)
        difference = weighted - targets
        aux = GradNormAux(task_losses=losses, grad_norms=norms, weighted_norms=weighted,
                          targets=targets, loss_ratios=ratios, loss_grad=difference.abs().sum(),
                          initial_losses=initial)
        return aux, difference.sign() * norms


def loss_grad_from(state: GradNormState, aux: GradNormAux) -> Tensor:
    """L_grad = sum_i |w_i n_i - target_i|, differentiable with respect to ``state.weights``."""
    return (state.weights * aux.grad_norms - aux.targets).abs().sum()


def gradnorm_loss(
    state: GradNormState, params: Params, losses_fn: LossesFn, *,
    process_group: dist.ProcessGroup | None = None, batch_size: BatchSize = None,
) -> tuple[Tensor, GradNormAux]:
    """L_grad at the shared parameters ``params`` (Chen et al. 2018, Eq. 2).

    L_grad = sum_i |w_i n_i - stopgrad(Gbar r_i^alpha)|, differentiable with respect to
    ``state.weights`` and nothing else: no gradient can reach the network from it. Pass its
    ``aux`` to :func:`update`, which records L_i(0) and skips bad steps from it::

        grads, aux = torch.func.grad(
            lambda w: gf.gradnorm_loss(state._replace(weights=w), shared, losses_fn),
            has_aux=True)(state.weights)
        state = gf.update(state, grads, aux=aux)

    :func:`step` does the same in one call, without the autograd of L_grad.

    Args:
        state: current state.
        params: pytree of the shared tensors W, typically the last shared layer's.
        losses_fn: maps ``params`` to the Tensor[T] of per-task losses; the T gradient
            norms come from one batched pass (:func:`task_gradients`).
        process_group: synchronise the per-task gradients and losses over this group's
            ranks (one all-reduce), so that L_grad is that of the global batch on every rank.
        batch_size: this rank's local batch size n_r when ranks' batches differ in size.
    """
    task_losses, grads = task_gradients(params, losses_fn, num_tasks=state.weights.shape[0])
    task_losses, norms = global_norms(task_losses, grads, process_group=process_group,
                                      batch_size=batch_size)
    aux, _ = gradnorm_statistics(state, task_losses, norms)
    return loss_grad_from(state, aux), aux
