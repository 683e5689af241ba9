"""The per-task-gradient pipeline: grad_W L_i for every task, their global mean, their norms.

Every GradNorm step of both APIs goes through :func:`global_norms`: the per-task gradients
(from :func:`task_gradients`, the fork of the heads, or the wrapper's autograd) are averaged
over the ranks when a process group is given, then normed.
"""

from __future__ import annotations

import functools
import math

import optree
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils import _pytree as pytree

from gradnorm_func._checks import check_num_tasks, check_task_vector
from gradnorm_func._distributed import check_unsharded, is_sharded, sync_task_gradients
from gradnorm_func._host import readable
from gradnorm_func._types import BatchSize, LossesFn, Params


def task_gradients(params: Params, losses_fn: LossesFn, *, num_tasks: int
                   ) -> tuple[Tensor, Params]:
    """Per-task losses L_i and gradients grad_params L_i, without a loop over tasks.

    One ``torch.func.vjp`` of ``losses_fn`` at ``params``, then ``vmap`` of its pullback
    over the T one-hot cotangents e_i: grad_params L_i = J^T e_i for every i in one pass.
    Pure, so it composes with ``torch.compile(fullgraph=True)``. The gradients of several
    micro-batches can be averaged before :func:`step_from_gradients` (gradient accumulation).

    Args:
        params: pytree of the shared tensors W (e.g. the last shared layer's parameters).
        losses_fn: maps ``params`` to the Tensor[T] of per-task losses.
        num_tasks: T, checked against the shape ``losses_fn`` returns.

    Returns:
        ``(task_losses, task_grads)``: Tensor[T], and a pytree like ``params`` whose leaves
        carry a leading task axis, [T, *leaf.shape]. A task whose loss does not depend on
        ``params`` gets zeros, which :func:`update` reports and skips.
    """
    check_num_tasks(num_tasks)
    leaves = pytree.tree_flatten(params)[0]
    if not leaves:
        raise ValueError("the shared parameters are empty: pass at least one tensor")
    if any(is_sharded(leaf) for leaf in leaves):
        paths, named_leaves, _ = optree.tree_flatten_with_path(params)  # names, for the error
        check_unsharded([(".".join(map(str, path)) or "params", leaf)
                         for path, leaf in zip(paths, named_leaves)])
    def checked_losses(p: Params) -> Tensor:
        return check_task_vector("losses_fn(params)", losses_fn(p), num_tasks)

    task_losses, pullback = torch.func.vjp(  # type: ignore[misc, unused-ignore]
        checked_losses, params)
    one_hot = torch.eye(num_tasks, device=task_losses.device).to(task_losses.dtype)
    (task_grads,) = torch.func.vmap(pullback)(one_hot)
    return task_losses, task_grads


def gradient_norms(task_grads: Params) -> Tensor:
    """n_i = sqrt(sum over leaves and elements of g_i^2) for leaves with a leading task axis.

    Exact to the gradients' precision over their whole range: squares of tiny or huge
    float32 entries (1e-30, 1e25) would underflow or overflow, and bfloat16 or float16
    gradients would lose the norm to rounding. In eager CPU code the norms are taken in the
    gradients' own precision (float32 at least) and kept when every n_i lies where no square
    can have left the range, sqrt(N tiny / eps) <= n_i < inf with N elements per task (read
    on the host, which costs no sync there); otherwise, and always on other devices and under
    ``torch.compile``, they are taken in float64 (float32 on MPS, which has no float64).
    Returns Tensor[T].
    """
    leaves = [leaf.detach().flatten(1) for leaf in pytree.tree_flatten(task_grads)[0]]
    if not leaves:
        raise ValueError("the shared parameters are empty: pass at least one tensor")
    wide = torch.float32 if leaves[0].device.type == "mps" else torch.float64
    own = functools.reduce(torch.promote_types, [leaf.dtype for leaf in leaves], torch.float32)
    if own != wide and readable(*leaves):
        norms = _norms(leaves, own)
        info = torch.finfo(own)
        lowest, highest = torch.aminmax(norms)  # NaN fails both comparisons
        elements = sum(leaf.shape[1] for leaf in leaves)
        if float(highest) < math.inf and float(lowest) >= math.sqrt(
                elements * info.tiny / info.eps):
            return norms
    return _norms(leaves, wide)


def _norms(leaves: list[Tensor], dtype: torch.dtype) -> Tensor:
    """The norms over dim 1 of the [T, N_k] leaves, taken together, computed in ``dtype``."""
    norms: list[Tensor] = [torch.linalg.vector_norm(leaf, dim=1, dtype=dtype) for leaf in leaves]
    return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms), dim=0)


def global_norms(task_losses: Tensor, task_grads: Params, *,
                 process_group: dist.ProcessGroup | None = None, batch_size: BatchSize = None
                 ) -> tuple[Tensor, Tensor]:
    """This step's losses and gradient norms, of the global batch when ``process_group`` is set.

    With a group, the per-task gradients and losses are first averaged over its ranks
    (:func:`sync_task_gradients`, one all-reduce), so that n_i = ||g_i|| is the norm of the
    global-batch gradient on every rank, not the mean of the per-rank norms.

    Returns:
        ``(task_losses, norms)``, both Tensor[T].
    """
    if process_group is not None:
        task_grads, task_losses = sync_task_gradients(
            task_grads, task_losses, process_group=process_group, batch_size=batch_size)
    return task_losses, gradient_norms(task_grads)
