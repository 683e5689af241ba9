"""``GradNorm``: a stateful drop-in for ordinary training loops; the maths stays in the core."""

from __future__ import annotations

from typing import Any, Iterable, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradnorm_func.distributed import (
    BatchSize,
    all_reduce_task_grads,
    check_same_tasks,
    check_unsharded,
    sync_group,
)
from gradnorm_func.capture import TaskFork
from gradnorm_func.norms import check_task_losses, per_task_norms
from gradnorm_func.objective import GradNormAux, gradnorm_loss_from_norms
from gradnorm_func.state import (
    GradNormState,
    Optimizer,
    check_real,
    init_state,
    state_from_dict,
    state_to,
    state_to_dict,
)
from gradnorm_func.step import step_from_norms
from gradnorm_func.update import update

SharedLayer = Union[nn.Module, Tensor, Iterable[Tensor]]


def named_shared_params(layer: SharedLayer) -> list[tuple[str, Tensor]]:
    """The tensors W that GradNorm norms: all of a module's trainable parameters (weight and
    bias alike), a single tensor, or each tensor of an iterable."""
    if isinstance(layer, nn.Module):
        named: list[tuple[str, Tensor]] = [
            (name, p) for name, p in layer.named_parameters() if p.requires_grad]
    elif isinstance(layer, Tensor):
        named = [("layer", layer)] if layer.requires_grad else []
    else:
        named = [(f"layer[{i}]", t) for i, t in enumerate(layer) if t.requires_grad]
    if not named:
        raise ValueError(f"the shared layer {type(layer).__name__} has no parameter that requires grad")
    return named


class GradNorm:
    """Holds a :class:`GradNormState` and delegates every computation to the functional core.

    The framework keeps ``.backward()``: GradNorm differentiates the task losses with
    ``torch.autograd.grad`` (retaining the graph itself) and never touches ``.grad``. These
    flows give the same weights:

    * recommended, no ``retain_graph`` in user code::

          loss = (gn.w_i * L_i).sum()
          gn.step(L_i)        # updates the weights; ``loss`` keeps the old w_i(t)
          loss.backward()
          optimizer.step()

    * the seed's flow: ``loss.backward(retain_graph=True)``, then
      ``gn.apply_grads(gn.gradnorm(L_i))``, then ``optimizer.step()``.

    * fastest, GradNorm after the backward (needs a fork, see below)::

          loss = (gn.w_i * L_i).sum()   # exactly this loss: its cotangents are divided by w_i
          loss.backward()
          gn.step(L_i)
          optimizer.step()

      The captured cotangents must come from the backward of exactly sum_i w_i L_i: a loss
      scaled by a ``GradScaler`` or carrying extra terms through the heads would change the
      norms. Use the recommended flow there.

    The weights are replaced, never modified in place, so a pending backward that holds the
    old ``w_i`` is unaffected.

    **Fast path.** Give each task head its own view of the shared representation z, either
    with ``heads=model.heads`` (separate head modules, each called with z as its first
    argument) or by feeding the heads ``z_t = gn.fork(z)`` in the model's forward (stacked
    heads, or ``z_t.unbind(0)``). GradNorm then takes grad_W L_i from the per-task cotangents
    at the fork: during the caller's backward when it runs first, otherwise from one backward
    through the heads only. Its cost no longer grows as T^2 (see :mod:`gradnorm_func.capture`).
    Without a fork, ``per_task_grads`` falls back to one batched backward of all tasks.

    Args:
        layer: the shared parameters W: an ``nn.Module`` (all its trainable parameters, bias
            included), a tensor, or an iterable of tensors.
        alpha: restoring-force exponent (0.12 on the paper's toy problem, 1.5 on NYUv2).
        number_of_tasks: T.
        lr: learning rate of the weights. L_grad is the paper's L1 *sum*, so a learning rate
            for an implementation that averages over tasks corresponds to ``lr / T`` here.
        lr_warmup: steps of linear learning-rate warm-up (0: none).
        device: device of the state. By default it is that of the shared layer, and the
            state follows the layer when the model moves (e.g. when Lightning moves it).
        optimizer: ``"sgd"`` (default, a plain gradient step) or ``"adam"`` (the paper's).
        process_group: the ``torch.distributed`` group to synchronise over; None means the
            default (world) group.
        sync: None (default) synchronises whenever ``torch.distributed`` is initialised at
            the time of a step; True requires it; False never synchronises. Synchronised
            steps norm the global-batch per-task gradients g_i = sum_r n_r g_i^(r) / sum_r n_r
            and use the global-batch losses, with one all-reduce per step, so every rank
            holds the same weights. The first synchronised step also checks, once, that all
            ranks agree on T and on the size of W.
        local_batch_size: n_r, this rank's batch size, to weight the ranks when their
            batches differ in size (e.g. an uneven last batch); None weights them equally,
            as DDP does for the model's gradients. It is an attribute: set
            ``gn.local_batch_size = len(x)`` before a step whose batch size changes.
        heads: one module per task, each receiving the fork z (the shared representation
            that ``layer`` feeds, possibly through a non-linearity) as its first argument.
            Forward-pre-hooks hand each head its own view of z, enabling the fast path.
        **options: further keyword arguments of :func:`init_state` (``initial_losses``,
            ``min_weight``, ``betas``, ``eps``, ``dtype``).
    """

    def __init__(self, layer: SharedLayer, alpha: float, number_of_tasks: int, lr: float = 1e-3,
                 lr_warmup: int = 0, device: torch.device | str | None = None, *,
                 optimizer: Optimizer = "sgd", process_group: dist.ProcessGroup | None = None,
                 sync: bool | None = None, local_batch_size: BatchSize = None,
                 heads: Sequence[nn.Module] | None = None,
                 **options: Any) -> None:
        if sync is False and process_group is not None:
            raise ValueError("process_group was given with sync=False: pass one or the other")
        self.named_params = named_shared_params(layer)
        check_unsharded(self.named_params)
        self.follow_layer_device = device is None
        if device is None:
            device = self.named_params[0][1].device
        self.state: GradNormState = init_state(number_of_tasks, alpha=alpha, lr=lr,
                                               optimizer=optimizer,
                                               warmup_steps=lr_warmup, device=device, **options)
        self.aux: GradNormAux | None = None  # the last step's losses, norms, targets, ...
        self._pending: tuple[Tensor, GradNormAux] | None = None
        self.process_group = process_group
        self.sync = sync
        self.local_batch_size = local_batch_size
        self._checked_groups: set[dist.ProcessGroup] = set()  # groups that agreed on T, numel(W)
        self._fork = TaskFork([p for _, p in self.named_params], number_of_tasks)
        if heads is not None:
            self._fork.attach(heads)

    @property
    def w_i(self) -> Tensor:
        """Tensor[T] of the current task weights w_i(t); a new tensor after every update."""
        self._follow_layer()
        return self.state.weights

    def _follow_layer(self) -> None:
        layer_device = self.named_params[0][1].device
        if self.follow_layer_device and self.state.weights.device != layer_device:
            self.state = state_to(self.state, layer_device)

    @property
    def number_of_tasks(self) -> int:
        return int(self.state.weights.shape[0])

    def fork(self, z: Tensor) -> Tensor:
        """z expanded to [T, *z.shape] (a view), for the heads: slice i must feed task i only.

        Call it in the model's forward where the shared representation z forks into the
        heads, e.g. ``out = torch.vmap(head)(z_t)`` for stacked heads or
        ``[head(v) for head, v in zip(heads, z_t.unbind(0))]``. This enables the fast path.
        """
        return self._fork.expand(z)

    def per_task_grads(self, L_i: Tensor) -> list[Tensor]:
        """grad_W L_i for every task, stacked on a leading task axis.

        From the fork of the last forward when there is one (see :meth:`fork`), otherwise
        from one batched backward of all tasks (``is_grads_batched``). The graph is
        retained, so the caller's ``backward`` still works.
        """
        check_task_losses(L_i, self.number_of_tasks)
        if not L_i.requires_grad:
            raise ValueError("L_i has no autograd graph: compute it from the model's outputs")
        grads = self._fork.per_task_grads(L_i, self.state.weights)
        if grads is None:
            params = [p for _, p in self.named_params]
            one_hot = torch.eye(self.number_of_tasks, dtype=L_i.dtype, device=L_i.device)
            grads = list(torch.autograd.grad(L_i, params, grad_outputs=one_hot,
                                             is_grads_batched=True, retain_graph=True,
                                             allow_unused=True))
        unused = [name for (name, _), g in zip(self.named_params, grads) if g is None]
        if unused:
            raise ValueError(f"the task losses do not depend on shared parameter(s) {unused}")
        return [g for g in grads if g is not None]

    def task_norms(self, L_i: Tensor) -> tuple[Tensor, Tensor]:
        """This step's task losses and ||grad_W L_i||_2 for every task, both Tensor[T].

        When synchronised (see ``sync``), both are those of the global batch: the per-task
        gradients and losses are averaged over the ranks before the norm is taken.
        """
        grads, losses = self.per_task_grads(L_i), L_i.detach()
        group = sync_group(self.process_group, self.sync)
        if group is None:
            return losses, per_task_norms(grads)
        if group not in self._checked_groups:
            check_same_tasks(self.number_of_tasks, sum(p.numel() for _, p in self.named_params),
                             process_group=group, device=losses.device)
            self._checked_groups.add(group)
        grads, losses = all_reduce_task_grads(grads, losses, process_group=group,
                                              batch_size=self.local_batch_size)
        return losses, per_task_norms(grads)

    def step(self, L_i: Tensor) -> Tensor:
        """One GradNorm update from this step's task losses; returns the new ``w_i``.

        Compute the training loss with ``w_i`` *before* calling this, as Algorithm 1 updates
        the network with w(t). Non-finite losses or norms skip the update (``self.aux.finite``).
        """
        self._follow_layer()
        self.state, self.aux = step_from_norms(self.state, *self.task_norms(L_i))
        self._pending = None
        return self.w_i

    def gradnorm(self, L_i: Tensor) -> Tensor:
        """L_grad for this step (seed API), differentiable with respect to the weights only.

        Pass the result to :meth:`apply_grads`.
        """
        self._follow_layer()
        task_losses, norms = self.task_norms(L_i)
        weights = self.state.weights.detach().requires_grad_(True)
        loss_grad, aux = gradnorm_loss_from_norms(self.state._replace(weights=weights),
                                                  task_losses, norms)
        self._pending = (weights, aux)
        return loss_grad

    def apply_grads(self, L_grad: Tensor, lr: float | None = None) -> Tensor:
        """Updates the weights from the L_grad of :meth:`gradnorm`; returns the new ``w_i``.

        Args:
            L_grad: the value :meth:`gradnorm` returned for this step.
            lr: a learning rate for this update only; the configured one otherwise.
        """
        if self._pending is None:
            raise RuntimeError("apply_grads needs the L_grad of a preceding gradnorm(L_i) call")
        weights, aux = self._pending
        (grads,) = torch.autograd.grad(L_grad, weights)
        state = self.state
        if lr is not None:
            lr = check_real("lr", lr, low=0.0, low_inclusive=False)
            state = state._replace(hyper=state.hyper._replace(lr=torch.full_like(state.hyper.lr, lr)))
        self.state = update(state, grads, aux=aux)._replace(hyper=self.state.hyper)
        self.aux, self._pending = aux, None
        return self.w_i

    def state_dict(self) -> dict[str, Tensor]:
        """The full state (weights, L_i(0), update count, moments, hyper-parameters) as tensors."""
        return state_to_dict(self.state)

    def load_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Restores :meth:`state_dict`'s output onto this object's device."""
        device = self.state.weights.device
        restored = state_from_dict(state_dict)
        if restored.weights.shape != self.state.weights.shape:
            raise ValueError(f"the state holds {restored.weights.shape[0]} tasks, "
                             f"this GradNorm has {self.number_of_tasks}")
        self.state = state_to(restored, device)
        self._pending = None
