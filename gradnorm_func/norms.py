"""Per-task gradient norms ||grad_W L_i||_2 at the shared parameters W, in one batched pass."""

from __future__ import annotations

from typing import Any, Callable

import optree
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils import _pytree as pytree

from gradnorm_func.distributed import BatchSize, all_reduce_task_grads, check_unsharded, is_sharded

Params = Any  # a pytree of tensors
LossesFn = Callable[[Params], Tensor]


def per_task_norms(per_task_grads: Params) -> Tensor:
    """||g_i||_2 over all leaves of a pytree whose leaves carry a leading task axis.

    Computes n_i = sqrt(sum_leaves sum_k g_i[k]^2) in float32 (float64 stays float64), so
    that bfloat16 or float16 gradients do not lose the norm to rounding.
    """
    leaves, _ = pytree.tree_flatten(per_task_grads)
    if not leaves:
        raise ValueError("the shared parameters are empty: pass at least one tensor")
    squares = [
        leaf.flatten(1).to(torch.promote_types(leaf.dtype, torch.float32)).square().sum(1)
        for leaf in leaves
    ]
    return torch.stack(squares).sum(0).sqrt()


def check_task_losses(task_losses: Tensor, num_tasks: int) -> None:
    """Raises ``ValueError`` unless ``task_losses`` is a float tensor of shape [num_tasks]."""
    if not isinstance(task_losses, Tensor):
        raise TypeError(f"losses must be a Tensor of shape ({num_tasks},), "
                        f"got {type(task_losses).__name__}")
    if task_losses.shape != (num_tasks,):
        raise ValueError(f"losses must have shape ({num_tasks},) (one loss per task), "
                         f"got {tuple(task_losses.shape)}")
    if not task_losses.dtype.is_floating_point:
        raise ValueError(f"losses must be floating point, got {task_losses.dtype}")


def task_gradient_norms(params: Params, losses: LossesFn, *, num_tasks: int,
                        process_group: dist.ProcessGroup | None = None,
                        batch_size: BatchSize = None) -> tuple[Tensor, Tensor]:
    """Per-task losses L_i and norms n_i = ||grad_params L_i||_2, without a loop over tasks.

    One ``torch.func.vjp`` of ``losses`` at ``params``, then ``vmap`` of its pullback over
    the T one-hot cotangents e_i: grad_params L_i = J^T e_i for every i in one batched pass.
    With a ``process_group``, the per-task gradients and losses are first averaged over its
    ranks (:func:`~gradnorm_func.distributed.all_reduce_task_grads`), so n_i is the norm of
    the global-batch gradient g_i = sum_r n_r g_i^(r) / sum_r n_r, the same on every rank.

    Args:
        params: pytree of the shared tensors W (e.g. the last shared layer's parameters).
        losses: maps ``params`` to the Tensor[T] of per-task losses.
        num_tasks: T, checked against the shape ``losses`` returns.
        process_group: a ``torch.distributed`` group (e.g. ``torch.distributed.group.WORLD``)
            to synchronise over with one all-reduce; None computes on the local batch only.
        batch_size: this rank's local batch size n_r, to weight the ranks when their batches
            differ in size; None weights them equally. Ignored without ``process_group``.

    Returns:
        ``(task_losses, norms)``, both Tensor[T]; ``task_losses`` keeps its dtype, ``norms``
        are at least float32.
    """
    if any(is_sharded(leaf) for leaf in pytree.tree_flatten(params)[0]):
        paths, leaves, _ = optree.tree_flatten_with_path(params)  # names, for the error only
        check_unsharded([(".".join(map(str, path)) or "params", leaf)
                         for path, leaf in zip(paths, leaves)])
    task_losses, pullback = torch.func.vjp(losses, params)  # type: ignore[misc, unused-ignore]
    check_task_losses(task_losses, num_tasks)
    one_hot = torch.eye(num_tasks, dtype=task_losses.dtype, device=task_losses.device)
    (per_task_grads,) = torch.func.vmap(pullback)(one_hot)
    if process_group is not None:
        per_task_grads, task_losses = all_reduce_task_grads(
            per_task_grads, task_losses, process_group=process_group, batch_size=batch_size)
    return task_losses, per_task_norms(per_task_grads)
