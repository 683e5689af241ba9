"""The fast path of the functional API: per-task gradients from one ordinary training gradient.

GradNorm needs grad_W L_i for every task. Where the shared representation z forks into the
task heads, the backward of the training loss sum_i a_i L_i already carries each head's own
cotangent a_i dL_i/dz, provided each head consumes its own copy of z. Then grad_W L_i is
the vjp of the shared segment z = f(W, h) (the last shared layer and anything between it and
the fork, e.g. a ReLU) applied to that cotangent, divided by a_i: T vjps of one segment,
batched, instead of T backwards through every head (O(T^2) when the heads are stacked).

Structure the losses so that the heads read ``z_t = fork(z, probe)``, a Tensor[T, *z.shape]
whose slice i feeds task i only (per-task heads stacked and ``vmap``-ed over its leading
axis, or ``z_t.unbind(0)`` for separate heads), and differentiate with respect to the zero
``probe`` as well as the parameters::

    def weighted_loss(params, probe):
        h = trunk(params, x)                         # input of the last shared segment
        z_t = gf.fork(segment(shared_of(params), h), probe)
        task_losses = torch.func.vmap(head_loss)(head_params(params), z_t, y_t)
        return (state.weights * task_losses).sum(), (task_losses, h)

    probe = gf.fork_probe(num_tasks, z_shape)        # zeros [T, *z_shape]
    (grads, cotangents), (task_losses, h) = torch.func.grad(
        weighted_loss, argnums=(0, 1), has_aux=True)(params, probe)
    task_grads = gf.fork_gradients(segment, shared_of(params), h, cotangents, state.weights)
    state, aux = gf.step_from_gradients(state, task_losses, task_grads)

``grads`` is exactly the model gradient of sum_i w_i L_i, and ``task_grads`` equal those of
:func:`task_gradients` to float rounding.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from gradnorm_func._checks import check_num_tasks
from gradnorm_func._types import Params, Segment


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


def fork_gradients(segment: Segment, shared: Params, segment_input: Tensor,
                   fork_cotangents: Tensor, loss_coefficients: Tensor) -> Params:
    """grad_W L_i for every task, from the cotangents at the fork of the loss sum_j a_j L_j.

    With z = segment(W, h) and c_i = a_i dL_i/dz (``fork_cotangents[i]``, the gradient with
    respect to :func:`fork`'s probe), grad_W L_i = vjp_segment(c_i) / a_i: one vjp of the
    segment, ``vmap``-ed over the T cotangents.

    Args:
        segment: ``segment(shared, h)``, the last shared layer and whatever lies between it
            and the fork, e.g. ``lambda p, h: torch.relu(functional_call(layer, p, (h,)))``.
        shared: pytree of the shared tensors W.
        segment_input: h, the segment's input (detached here).
        fork_cotangents: Tensor[T, *z.shape], the gradient with respect to the probe.
        loss_coefficients: Tensor[T], a_i = dLoss/dL_i, the coefficient of each L_i in the
            loss that was differentiated: ``state.weights`` for sum_i w_i L_i, times the loss
            scale if the loss was scaled. Every a_i must be non-zero.

    Returns:
        A pytree like ``shared`` of [T, *leaf.shape] tensors, for :func:`step_from_gradients`.
    """
    if loss_coefficients.dim() != 1 or fork_cotangents.shape[:1] != loss_coefficients.shape:
        raise ValueError(f"fork_cotangents must have a leading task axis of the length of "
                         f"loss_coefficients {tuple(loss_coefficients.shape)}, "
                         f"got shape {tuple(fork_cotangents.shape)}")
    _, pullback = torch.func.vjp(  # type: ignore[misc, unused-ignore]
        lambda w: segment(w, segment_input.detach()), shared)
    (task_grads,) = torch.func.vmap(pullback)(fork_cotangents)
    coefficients = loss_coefficients.detach()
    return torch.utils._pytree.tree_map(
        lambda g: g / coefficients.to(g.dtype).view(-1, *[1] * (g.dim() - 1)), task_grads)
