"""The GradNorm loss L_grad of Chen et al. (2018), Algorithm 1."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from gradnorm_func.distributed import BatchSize
from gradnorm_func.norms import LossesFn, Params, check_task_losses, task_gradient_norms
from gradnorm_func.state import GradNormState


class GradNormAux(NamedTuple):
    """What one GradNorm step saw, for logging. Every tensor is detached."""

    losses: Tensor  # [T] task losses L_i(t), in the state's dtype
    grad_norms: Tensor  # [T] ||grad_W L_i(t)||_2, unweighted
    weighted_norms: Tensor  # [T] G_i(t) = w_i(t) ||grad_W L_i(t)||_2
    targets: Tensor  # [T] Gbar(t) r_i(t)^alpha, held constant
    loss_ratios: Tensor  # [T] r_i(t) = Ltilde_i(t) / mean_j Ltilde_j(t)
    loss_grad: Tensor  # [] L_grad(t) = sum_i |G_i(t) - target_i(t)|
    initial_losses: Tensor  # [T] L_i(0) used for the ratios
    finite: Tensor  # [] bool: all losses and norms finite; False skips the update


def gradnorm_loss_from_norms(
    state: GradNormState, task_losses: Tensor, grad_norms: Tensor
) -> tuple[Tensor, GradNormAux]:
    """L_grad from per-task losses and unweighted gradient norms (Chen et al. 2018, Eq. 2).

    With G_i = w_i ||grad_W L_i||, Gbar = mean_i G_i, Ltilde_i = L_i / L_i(0) and
    r_i = Ltilde_i / mean_j Ltilde_j::

        L_grad = sum_i | G_i - stopgrad(Gbar * r_i^alpha) |

    The target is a constant, so L_grad depends on the weights only through G_i and
    dL_grad/dw_i = sign(G_i - target_i) ||grad_W L_i||. ``task_losses`` and ``grad_norms``
    are detached: no gradient can reach the network from here.

    Args:
        state: current state; L_i(0) is taken from ``task_losses`` when not yet recorded.
        task_losses: Tensor[T] of L_i(t).
        grad_norms: Tensor[T] of ||grad_W L_i(t)||_2.

    Returns:
        ``(loss_grad, aux)``; ``loss_grad`` is differentiable with respect to
        ``state.weights`` and nothing else.
    """
    aux, _ = _statistics(state, task_losses, grad_norms)
    loss_grad = (state.weights * aux.grad_norms - aux.targets).abs().sum()
    return loss_grad, aux


def loss_grad_gradient(state: GradNormState, task_losses: Tensor,
                       grad_norms: Tensor) -> tuple[Tensor, GradNormAux]:
    """dL_grad/dw and the aux of :func:`gradnorm_loss_from_norms`, without autograd.

    With the target held constant, d/dw_i sum_j |w_j n_j - target_j| = sign(G_i - target_i) n_i
    where n_i = ||grad_W L_i||_2 (Chen et al. 2018, Eq. 2). This is the value autograd gives
    for ``gradnorm_loss_from_norms``, bit for bit, at a fraction of the cost of ``torch.func.grad``.
    """
    aux, difference = _statistics(state, task_losses, grad_norms)
    return difference.sign() * aux.grad_norms, aux


def _statistics(state: GradNormState, task_losses: Tensor,
                grad_norms: Tensor) -> tuple[GradNormAux, Tensor]:
    """G_i, the targets, the ratios and L_grad, all detached, and G_i - target_i."""
    num_tasks = state.weights.shape[0]
    check_task_losses(task_losses, num_tasks)
    check_task_losses(grad_norms, num_tasks)
    dtype = state.weights.dtype
    losses = task_losses.detach().to(dtype)
    norms = grad_norms.detach().to(dtype)
    initial = torch.where(torch.isnan(state.initial_losses), losses, state.initial_losses)
    weighted = state.weights.detach() * norms
    inverse_rates = losses / initial
    ratios = inverse_rates / inverse_rates.mean()
    targets = weighted.mean() * ratios.pow(state.hyper.alpha)
    finite = torch.isfinite(torch.stack((losses, norms))).all()
    difference = weighted - targets
    return GradNormAux(
        losses=losses,
        grad_norms=norms,
        weighted_norms=weighted,
        targets=targets,
        loss_ratios=ratios,
        loss_grad=difference.abs().sum(),
        initial_losses=initial,
        finite=finite,
    ), difference


def gradnorm_loss(
    state: GradNormState, params: Params, losses: LossesFn, *,
    process_group: dist.ProcessGroup | None = None, batch_size: BatchSize = None,
) -> tuple[Tensor, GradNormAux]:
    """L_grad at the shared parameters ``params``; see :func:`gradnorm_loss_from_norms`.

    Args:
        state: current state.
        params: pytree of the shared tensors W, typically the last shared layer's.
        losses: maps ``params`` to the Tensor[T] of per-task losses. The T gradient norms
            come from one batched pass (:func:`task_gradient_norms`).
        process_group: synchronise the per-task gradients and losses over this group's
            ranks (one all-reduce), so that L_grad is that of the global batch on every rank.
        batch_size: this rank's local batch size n_r when ranks' batches differ in size.
    """
    task_losses, norms = task_gradient_norms(params, losses, num_tasks=state.weights.shape[0],
                                             process_group=process_group, batch_size=batch_size)
    return gradnorm_loss_from_norms(state, task_losses, norms)
