"""The fast path of the functional API: per-task norms from one ordinary training gradient.

GradNorm needs n_i = ||grad_W L_i||_2 for every task. Where the shared representation z
forks into the task heads, the backward of the training loss sum_i w_i L_i already carries
each head's own cotangent w_i dL_i/dz, provided each head consumes its own copy of z. Then
grad_W (w_i L_i) is the vjp of the shared segment z = f(W, h) (the last shared layer and
anything between it and the fork, e.g. a ReLU) applied to that cotangent: T vjps of one
segment, instead of T backwards through every head (O(T^2) when the heads are stacked).

Structure ``losses`` so that the heads read ``z_t = fork(z, probe)``, a Tensor[T, *z.shape]
whose slice i feeds task i only (per-task heads stacked and ``vmap``-ed over its leading
axis, or ``z_t.unbind(0)`` for separate heads), and differentiate with respect to the zero
``probe`` as well as the parameters::

    def weighted_loss(params, probe):
        h = trunk(params, x)                         # input of the last shared segment
        z_t = gf.fork(segment(params, h), probe)     # [T, B, ...]
        task_losses = torch.func.vmap(head_loss)(head_params(params), z_t, y_t)
        return (state.weights * task_losses).sum(), (task_losses, h)

    probe = gf.fork_probe(num_tasks, z_shape)        # zeros [T, *z_shape]
    (grads, fork_grads), (task_losses, h) = torch.func.grad(
        weighted_loss, argnums=(0, 1), has_aux=True)(params, probe)
    norms = gf.fork_norms(segment, shared_params, h, fork_grads, state.weights)
    state, aux = gf.step_from_norms(state, task_losses, norms)

``grads`` is exactly the model gradient of sum_i w_i L_i, and ``norms`` equal those of
:func:`task_gradient_norms` to float rounding.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from gradnorm_func.norms import Params, per_task_norms
from gradnorm_func.state import check_num_tasks

Segment = Callable[[Params, Tensor], Tensor]


def fork_probe(num_tasks: int, shape: Sequence[int], *, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> Tensor:
    """The zero Tensor[T, *shape] to pass to :func:`fork` and differentiate with respect to."""
    check_num_tasks(num_tasks)
    return torch.zeros((num_tasks, *shape), dtype=dtype, device=device)


def fork(z: Tensor, probe: Tensor) -> Tensor:
    """Per-task copies z_t[i] = z + probe[i] of the shared representation z.

    The value is z on every slice (``probe`` is zero), and the gradient of a loss with
    respect to ``probe`` is, slice by slice, the cotangent that task i's head sends back to z.

    Raises:
        ValueError: when ``probe`` is not of shape [T, *z.shape].
    """
    if probe.dim() != z.dim() + 1 or probe.shape[1:] != z.shape:
        raise ValueError(f"probe must have shape (T, *{tuple(z.shape)}), got {tuple(probe.shape)}")
    return z.unsqueeze(0) + probe


def fork_norms(segment: Segment, shared: Params, segment_input: Tensor, fork_grads: Tensor,
               weights: Tensor) -> Tensor:
    """n_i = ||grad_W L_i||_2 from the cotangents at the fork of the loss sum_j w_j L_j.

    With z = segment(W, h) and c_i = w_i dL_i/dz (``fork_grads[i]``), grad_W (w_i L_i) is
    the vjp of ``segment`` at W applied to c_i, so::

        n_i = ||vjp_segment(c_i)||_2 / w_i

    One vjp of the segment, ``vmap``-ed over the T cotangents.

    Args:
        segment: ``segment(shared, h)``, the last shared layer and whatever lies between it
            and the fork, e.g. ``lambda p, h: torch.relu(functional_call(layer, p, (h,)))``.
        shared: pytree of the shared tensors W.
        segment_input: h, the segment's input (detached here).
        fork_grads: Tensor[T, *z.shape], the gradient with respect to :func:`fork`'s probe.
        weights: Tensor[T] of the w_i (all positive) that weighted the losses.

    Returns:
        Tensor[T] of norms, at least float32.
    """
    if fork_grads.shape[:1] != weights.shape or weights.dim() != 1:
        raise ValueError(f"fork_grads must have a leading task axis of length {weights.shape}, "
                         f"got shape {tuple(fork_grads.shape)}")
    _, pullback = torch.func.vjp(  # type: ignore[misc, unused-ignore]
        lambda w: segment(w, segment_input.detach()), shared)
    (per_task_grads,) = torch.func.vmap(pullback)(fork_grads)
    return per_task_norms(per_task_grads) / weights.detach()
