"""Data-parallel GradNorm: every rank norms the *global-batch* per-task gradients.

Under data parallelism with R ranks, rank r holds n_r samples, its per-task losses
L_i^(r) (means over its local batch) and per-task gradients g_i^(r) = grad_W L_i^(r). The
global-batch quantities are the sample-weighted means::

    g_i = sum_r n_r g_i^(r) / sum_r n_r,        L_i = sum_r n_r L_i^(r) / sum_r n_r,

and GradNorm needs ||g_i||_2, the norm of the mean, which is not the mean of the per-rank
norms ||g_i^(r)||_2. :func:`sync_task_gradients` computes g_i and L_i on every rank with
one all-reduce of one flat buffer, so that every rank then takes the same step and holds
bit-identical weights.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor
from torch.utils import _pytree as pytree

from gradnorm_func._types import BatchSize, Params


def resolve_group(process_group: dist.ProcessGroup | None, sync: bool | None
                  ) -> dist.ProcessGroup | None:
    """The group to synchronise over, or None for a single-process step.

    Args:
        process_group: the group; None means the default (world) group.
        sync: True always synchronises, False never does, None synchronises exactly when
            ``torch.distributed`` is available and initialised.

    Raises:
        RuntimeError: ``sync=True`` while no process group is initialised.
    """
    initialised = dist.is_available() and dist.is_initialized()
    if sync is None:
        sync = initialised
    if not sync:
        return None
    if not initialised:
        raise RuntimeError("sync=True needs an initialised process group: call "
                           "torch.distributed.init_process_group first")
    return dist.group.WORLD if process_group is None else process_group


def check_same_tasks(num_tasks: int, shared_numel: int, *, process_group: dist.ProcessGroup,
                     device: torch.device | str = "cpu") -> None:
    """Raises ``ValueError`` on every rank unless all ranks agree on T and on numel(W).

    One small all-reduce (MAX of (T, -T, numel, -numel)) and one host sync: call it once,
    before the first synchronised step, not on the hot path. Without it, ranks with
    different buffer lengths would corrupt or deadlock the gradient all-reduce.

    Args:
        num_tasks: this rank's T.
        shared_numel: this rank's number of shared elements, numel(W).
        process_group: the group whose ranks must agree.
        device: a device the group's backend reduces on ("cpu" for gloo, a GPU for NCCL).
    """
    local = torch.tensor([num_tasks, -num_tasks, shared_numel, -shared_numel], device=device)
    dist.all_reduce(local, op=dist.ReduceOp.MAX, group=process_group)
    t_max, t_neg_min, k_max, k_neg_min = local.tolist()
    rank = dist.get_rank(process_group)
    if -t_neg_min != t_max:
        raise ValueError(f"ranks disagree on the number of tasks T: rank {rank} has T={num_tasks}, "
                         f"the ranks range over T in [{-t_neg_min}, {t_max}]")
    if -k_neg_min != k_max:
        raise ValueError(f"ranks disagree on the size of the shared parameters W: rank {rank} has "
                         f"{shared_numel} elements, the ranks range over [{-k_neg_min}, {k_max}]")


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (FSDP2, tensor parallelism) or an FSDP ``FlatParameter``."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # no DTensor exists before its import
    return bool(getattr(tensor, "_is_flat_param", False)
                or (dtensor is not None and isinstance(tensor, dtensor.DTensor)))


def check_unsharded(named_tensors: list[tuple[str, Tensor]]) -> None:
    """Raises ``ValueError`` naming any shared tensor that :func:`is_sharded`: each rank holds
    only a shard of W there, so a data-parallel all-reduce of per-task gradients would not
    give grad_W L_i."""
    sharded = [name for name, t in named_tensors if is_sharded(t)]
    if sharded:
        raise ValueError(f"the shared parameter(s) {sharded} are sharded (DTensor or FSDP "
                         "FlatParameter); GradNorm supports replicated (DDP) shared layers only")


def sync_task_gradients(task_grads: Params, task_losses: Tensor, *,
                        process_group: dist.ProcessGroup, batch_size: BatchSize = None
                        ) -> tuple[Params, Tensor]:
    """Global-batch per-task gradients g_i and losses L_i, identical on every rank.

    Computes g_i = sum_r n_r g_i^(r) / sum_r n_r and L_i = sum_r n_r L_i^(r) / sum_r n_r
    with a single all-reduce (SUM) of one flat buffer holding n_r g^(r) (T x numel(W)),
    n_r L^(r) (T) and n_r (1), i.e. (T (numel(W) + 1) + 1) elements of the promoted dtype
    (at least float32) per step. A NaN on any rank reaches every rank through the sum, so
    all ranks skip the same update.

    Uses ``torch.distributed._functional_collectives``, so it traces into a
    ``torch.compile(fullgraph=True)`` graph.

    Args:
        task_grads: pytree whose leaves are the local grad_W L_i^(r), each with a
            leading task axis of size T.
        task_losses: Tensor[T] of the local losses L_i^(r), each a mean over the local batch.
        process_group: the group whose ranks are averaged.
        batch_size: n_r, this rank's local batch size (int or 0-d tensor). None weights
            every rank equally (n_r = 1), as DDP does for the model's gradients; that is the
            global-batch mean whenever all local batches are equally large.

    Returns:
        ``(grads, losses)``: the same pytree of g_i (leaves in the promoted dtype) and the
        Tensor[T] of L_i (in ``task_losses``' dtype). Both are detached.
    """
    leaves, treedef = pytree.tree_flatten(task_grads)
    num_tasks = task_losses.shape[0]
    dtype = torch.promote_types(task_losses.dtype, torch.float32)
    for leaf in leaves:
        dtype = torch.promote_types(dtype, leaf.dtype)
    weight = torch.as_tensor(1 if batch_size is None else batch_size, dtype=dtype,
                             device=task_losses.device).detach().reshape(1)
    blocks = [leaf.detach().reshape(num_tasks, -1).to(dtype) for leaf in leaves]
    blocks.append(task_losses.detach().reshape(num_tasks, 1).to(dtype))
    buffer = torch.cat([(weight * torch.cat(blocks, dim=1)).flatten(), weight])
    total = funcol.all_reduce(buffer, "sum", process_group)
    means = (total[:-1] / total[-1]).reshape(num_tasks, -1)
    sizes = [leaf[0].numel() for leaf in leaves] + [1]
    *grads, losses = means.split(sizes, dim=1)
    grads = [g.reshape(leaf.shape) for g, leaf in zip(grads, leaves)]
    return pytree.tree_unflatten(grads, treedef), losses.reshape(num_tasks).to(task_losses.dtype)
