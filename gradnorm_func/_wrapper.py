"""``GradNorm``: a module that balances the task losses of any training loop.

The module keeps the state, the hooks and the order of the flows; the maths is the core's.
"""

from __future__ import annotations

import warnings
import weakref
from functools import partial
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradnorm_func._capture import FREED_GRAPH, Record, TaskFork, stack_tasks
from gradnorm_func._checks import check_count, check_held, check_real, check_task_vector
from gradnorm_func._distributed import check_same_tasks, check_unsharded, resolve_group
from gradnorm_func._gradients import global_norms, gradient_norms
from gradnorm_func._objective import GradNormAux, gradnorm_statistics, loss_grad_from
from gradnorm_func._host import readable
from gradnorm_func._reporting import SkippedUpdateWarning, skip_message, skip_summary
from gradnorm_func._state import (
    GradNormHyperParams,
    GradNormState,
    init_state,
    state_from_dict,
)
from gradnorm_func._step import step_from_gradients, step_from_norms
from gradnorm_func._types import BatchSize, Optimizer, SharedLayer, TaskVectorLike
from gradnorm_func._update import update

_STATE_BUFFERS = GradNormState._fields[:-1]  # every field but ``hyper``, which comes last


def named_shared_params(layer: SharedLayer) -> list[tuple[str, Tensor]]:
    """The tensors W that GradNorm norms: all of a module's trainable parameters (weight and
    bias alike), a single tensor, or each tensor of an iterable.

    Raises:
        TypeError: ``layer`` is none of these.
        ValueError: it holds no tensor that requires grad.
    """
    named: list[tuple[str, Tensor]]
    if isinstance(layer, nn.Module):
        named = [(name, p) for name, p in layer.named_parameters() if p.requires_grad]
    elif isinstance(layer, Tensor):
        named = [("layer", layer)] if layer.requires_grad else []
    elif isinstance(layer, Iterable) and not isinstance(layer, (str, bytes, Mapping)):
        items = list(layer)
        bad = [i for i, t in enumerate(items) if not isinstance(t, Tensor)]
        if bad:
            raise TypeError(f"layer must be an nn.Module, a Tensor or an iterable of Tensors; "
                            f"item(s) {bad} of the iterable are not Tensors")
        named = [(f"layer[{i}]", t) for i, t in enumerate(items) if t.requires_grad]
    else:
        raise TypeError(f"layer must be an nn.Module (e.g. model.last_shared_layer), a Tensor or "
                        f"an iterable of Tensors, got {type(layer).__name__} {layer!r}")
    if not named:
        raise ValueError(f"the shared layer ({type(layer).__name__}) has no parameter that "
                         "requires grad: pass the last layer that every task shares and trains")
    return named


class _Ticket:
    """One ``forward``'s claim on the backward that follows it."""

    def __init__(self, task_losses: Tensor, records: list[Record], last: bool) -> None:
        self.task_losses = task_losses  # detached L_i
        self.records = records  # the forks armed for this backward (empty: general path)
        self.last = last  # this micro-batch closes an accumulation window
        self.grads: list[Tensor] | None = None  # general path: grad_W L_i, computed in forward
        self.coefficients: Tensor | None = None  # a_i = dLoss/dL_i seen by the backward


class _HyperParams(nn.Module):
    """The hyper-parameters as buffers, so that they appear as ``hyper.*`` in state dicts.

    Loading is done by :class:`GradNorm`, which validates the whole state at once.
    """

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        return None


class GradNorm(nn.Module):
    """GradNorm task weights for an ordinary training loop: ``loss = gradnorm(L_i)``.

    A module that holds the :class:`GradNormState` as buffers and delegates every
    computation to the functional core. The framework keeps ``.backward()``::

        gradnorm = GradNorm(model.last_shared_layer, alpha=1.5, number_of_tasks=T)
        loss = gradnorm(L_i)          # sum_i w_i(t) L_i, and this step's update is arranged
        loss.backward()               # ... which runs at the end of this backward
        optimizer.step()

    ``forward`` returns sum_i w_i(t) L_i with the weights from before the update (Algorithm
    1) and registers a hook on ``L_i``; when the backward reaches it, GradNorm takes the
    per-task gradients at W and updates the weights once that backward has finished. The
    update is exact under any positive loss scale (a ``GradScaler``, ``loss * 1024``) and with
    extra terms added to the returned loss, because the coefficient of each L_i is read from
    the backward itself. In ``eval()`` mode or under ``torch.no_grad()`` it only returns the
    weighted sum; in training, ``L_i`` must have an autograd graph.

    Assigned as an attribute of a model (a ``LightningModule``, a ``PreTrainedModel``), its
    state is part of the model's ``state_dict()`` and moves with ``.to(device)``. It has no
    parameters, so an optimizer over ``model.parameters()`` never trains the weights, and it
    does not register the shared layer as a child. Its buffers keep their dtype when the
    model is cast (``.half()``, ``.to(torch.bfloat16)``).

    Other flows give the same weights: ``gradnorm.step(L_i)`` before ``loss.backward()``
    (with ``loss = (gradnorm.w_i * L_i).sum()`` computed first), and the seed library's
    ``loss.backward(retain_graph=True)``, then ``gradnorm.apply_grads(gradnorm.gradnorm(L_i))``.

    **Fast path.** Give each task head its own view of the shared representation z, with
    ``heads=model.heads`` (separate head modules, each called with z as its first argument)
    or ``z_t = gradnorm.fork(z)`` in the model's forward. GradNorm then takes grad_W L_i from
    the per-task cotangents at the fork, in closed form when W is a Linear or ConvNd layer
    and z its output or an elementwise activation of it. Without a fork, it takes one
    backward per task from L_i. Every use of W must come before the fork.

    Args:
        layer: the shared parameters W: an ``nn.Module`` (all its trainable parameters, bias
            included), a tensor, or an iterable of tensors.
        alpha: restoring-force exponent (0.12 on the paper's toy problem, 1.5 on NYUv2).
        number_of_tasks: T.
        lr: learning rate of the weights (Adam at the paper's 0.025 by default).
        warmup_steps: steps of linear learning-rate warm-up (0: none). Also accepted as the
            seed library's ``lr_warmup=``.
        device: device of the state. By default it is that of the shared layer, and the
            state follows the layer when the model moves.
        optimizer: ``"adam"`` (default, the paper's) or ``"sgd"``.
        initial_losses: L_i(0), e.g. log(C) for a C-class cross-entropy; by default the
            losses of the first applied update.
        initial_weights: positive prior weights w_i(0) (default all 1); their sum S is kept.
        betas, eps, min_weight, dtype: see :func:`init_state`.
        accumulation_steps: k micro-batches per GradNorm step: over k calls of
            ``gradnorm(L_i)`` (or ``step``) the weights stay fixed, then one update uses the
            mean of the k micro-batches' per-task gradients and losses, which equals the
            full-batch update. Under DDP there is one all-reduce per window.
        update_every: compute the norms and update the weights on every k-th step (window)
            only; the steps in between add no per-task work.
        heads: one module per task, each receiving z as its first argument (fast path).
        process_group: the ``torch.distributed`` group to synchronise over; None means the
            default (world) group.
        sync: None (default) synchronises whenever ``torch.distributed`` is initialised at
            the time of a step; True requires it; False never synchronises. Synchronised
            steps norm the global-batch per-task gradients, so every rank holds the same
            weights. The first synchronised step checks, once, that all ranks agree on T
            and on the size of W.
        local_batch_size: n_r, this rank's number of samples in a step (a window, under
            accumulation), to weight ranks whose batches differ in size; None weights them
            equally, as DDP does. An attribute: set it before a step whose size changes.
    """

    weights: Tensor
    initial_losses: Tensor
    update_count: Tensor
    skipped_count: Tensor
    skipped: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    steps: Tensor

    def __init__(self, layer: SharedLayer, alpha: float, number_of_tasks: int,
                 lr: float = 0.025, warmup_steps: int = 0,
                 device: torch.device | str | None = None, *,
                 lr_warmup: int | None = None, optimizer: Optimizer = "adam",
                 initial_losses: TaskVectorLike | None = None,
                 initial_weights: TaskVectorLike | None = None,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 min_weight: float = 1e-3, dtype: torch.dtype = torch.float32,
                 accumulation_steps: int = 1, update_every: int = 1,
                 heads: Sequence[nn.Module] | None = None,
                 process_group: dist.ProcessGroup | None = None, sync: bool | None = None,
                 local_batch_size: BatchSize = None) -> None:
        super().__init__()
        if lr_warmup is not None:
            if warmup_steps:
                raise TypeError("pass the warm-up once: warmup_steps=N (lr_warmup is the seed "
                                "library's name for the same setting)")
            warmup_steps = lr_warmup
        if sync is False and process_group is not None:
            raise ValueError("process_group was given with sync=False: pass one or the other")
        self.accumulation_steps = check_count("accumulation_steps", accumulation_steps, low=1)
        self.update_every = check_count("update_every", update_every, low=1)
        named = named_shared_params(layer)
        check_unsharded(named)
        self._shared = [p for _, p in named]  # a list: the layer is not registered as a child
        self._follow_layer_device = device is None
        state = init_state(number_of_tasks, alpha=alpha, lr=lr, optimizer=optimizer,
                           warmup_steps=warmup_steps, initial_losses=initial_losses,
                           initial_weights=initial_weights, betas=betas, eps=eps,
                           min_weight=min_weight, dtype=dtype,
                           device=self._shared[0].device if device is None else device)
        for name in _STATE_BUFFERS:
            self.register_buffer(name, getattr(state, name))
        self.hyper = _HyperParams()
        for name, value in state.hyper._asdict().items():
            self.hyper.register_buffer(name, value)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64,
                                                  device=state.weights.device))
        self._known_buffers = self._buffer_objects()  # to notice buffers replaced from outside
        self.aux: GradNormAux | None = None  # the latest step's losses, norms, targets, ...
        self.process_group = process_group
        self.sync = sync
        self.local_batch_size = local_batch_size
        self._steps = 0  # GradNorm steps (windows) begun; ``steps`` holds it in checkpoints
        self._micro_batches = 0  # micro-batches of the current window seen so far
        self._sums: tuple[Tensor, list[Tensor], int] | None = None  # the window's L, grads, count
        self._pending: tuple[Tensor, GradNormAux] | None = None  # gradnorm() -> apply_grads()
        self._last_losses: weakref.ref[Tensor] | None = None  # the L_i of the latest forward
        self._checked_groups: set[dist.ProcessGroup] = set()  # groups that agreed on T, numel(W)
        self._deferred: list[tuple[torch.cuda.Event, Tensor]] = []  # skip summaries in flight
        self._fork = TaskFork(layer if isinstance(layer, nn.Module) else None, named,
                              number_of_tasks, self._recording)
        if heads is not None:
            self._fork.attach(heads)

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> GradNormState:
        """The current :class:`GradNormState` (its tensors are this module's buffers)."""
        fields: dict[str, Any] = {name: self._buffers[name] for name in _STATE_BUFFERS}
        hyper: dict[str, Any] = self.hyper._buffers
        return GradNormState(**fields, hyper=GradNormHyperParams(**hyper))

    def _set_state(self, state: GradNormState) -> None:
        """Replaces (never modifies in place) every buffer, so a pending backward holding
        the old ``w_i`` is unaffected."""
        self._buffers.update(zip(_STATE_BUFFERS, state[:-1]))
        self.hyper._buffers.update(state.hyper._asdict())
        self._known_buffers = self._buffer_objects()

    @property
    def w_i(self) -> Tensor:
        """Tensor[T] of the current task weights w_i(t); a new tensor after every update."""
        self._follow_layer()
        return self.weights

    @property
    def number_of_tasks(self) -> int:
        return int(self.weights.shape[0])

    def _follow_layer(self) -> None:
        device = self._shared[0].device
        if self._follow_layer_device and self.weights.device != device:
            self.to(device)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> GradNorm:
        """Moves the buffers with the model but keeps their dtypes: a model cast to half
        precision must not round the state (see ``check_state_dtype``)."""
        def move_only(t: Tensor) -> Tensor:
            device = fn(torch.empty(0, dtype=t.dtype, device=t.device)).device
            return t.to(device)
        moved: GradNorm = super()._apply(  # type: ignore[no-untyped-call, unused-ignore]
            move_only, recurse)
        self._known_buffers = self._buffer_objects()  # a move is not a load: nothing to check
        return moved

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str,
                            keep_vars: bool) -> None:
        self._check_buffers()
        self.steps = torch.tensor(self._steps, device=self.weights.device)
        self._known_buffers = self._buffer_objects()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str,
                              local_metadata: Any, strict: bool, missing_keys: list[str],
                              unexpected_keys: list[str], error_msgs: list[str]) -> None:
        """Validates the whole state (:func:`state_from_dict`) and copies it in; checkpoints
        written before ``skipped_count``, ``skipped``, ``hyper.weight_sum`` and ``steps``
        existed load with their defaults. A checkpoint without any GradNorm entry reports
        them as missing (an error under ``strict``, as for any module)."""
        own = {key[len(prefix):]: value for key, value in state_dict.items()
               if key.startswith(prefix)}
        if not own:
            missing_keys.extend(prefix + key for key in self.state_dict())
            return
        self._adopt(own)

    def _adopt(self, flat: Mapping[str, Any]) -> None:
        """Validates a state dict (:func:`state_from_dict`) and makes it this module's state."""
        device = self.weights.device
        if device.type == "meta":  # built under torch.device("meta"): take the loaded device
            device = flat["weights"].device if isinstance(flat.get("weights"), Tensor) else device
        state = state_from_dict(flat, dtype=self.weights.dtype, device=device)
        if state.weights.shape != self.weights.shape:
            raise ValueError(f"the checkpoint holds {state.weights.shape[0]} task weights, this "
                             f"GradNorm has number_of_tasks={self.number_of_tasks}")
        steps = flat.get("steps", torch.zeros((), dtype=torch.int64))
        if not isinstance(steps, Tensor) or steps.shape != () or int(steps) < 0:
            raise ValueError(f"state entry 'steps' must be a non-negative 0-d tensor, "
                             f"got {steps!r}")
        self._set_state(state)
        self.steps = steps.detach().to(dtype=torch.int64, device=device).clone()
        self._steps, self._micro_batches, self._sums, self._pending = int(steps), 0, None, None
        self._known_buffers = self._buffer_objects()

    def _buffer_objects(self) -> tuple[Tensor | None, ...]:
        return (*self._buffers.values(), *self.hyper._buffers.values())

    def _check_buffers(self) -> None:
        """Validates, once, buffers that a loader replaced without ``load_state_dict``
        (``from_pretrained`` of transformers assigns each tensor, the weights among them).
        Costs one identity comparison while the weights are those GradNorm last wrote."""
        if self._buffers["weights"] is self._known_buffers[0]:
            return
        current = self._buffer_objects()
        if len(current) != len(self._known_buffers) or any(
                a is not b for a, b in zip(current, self._known_buffers)):
            flat: dict[str, Any] = {name: value for name, value in self._buffers.items()}
            flat.update({f"hyper.{name}": value for name, value in self.hyper._buffers.items()})
            self._adopt(flat)

    # ------------------------------------------------------------------ windows
    def _recording(self) -> bool:
        """Whether the next GradNorm step needs the fork of this forward."""
        return self.training and self._steps % self.update_every == 0

    def _advance(self) -> tuple[bool, bool]:
        """Counts one micro-batch; returns (this window updates, this micro-batch closes it)."""
        due = self._steps % self.update_every == 0
        self._micro_batches += 1
        last = self._micro_batches == self.accumulation_steps
        if last:
            self._micro_batches = 0
            self._steps += 1
        return due, last

    def _accumulate(self, task_losses: Tensor, grads: list[Tensor], last: bool,
                    coefficients: Tensor | None = None) -> None:
        """Adds one micro-batch's L_i and grad_W L_i to the window; steps when it closes.

        With the loss coefficients a_i, ``grads`` hold grad_W (a_i L_i), which are divided by
        a_i; for a window of one micro-batch on one process only their norms are, as
        ||grad_W L_i|| = ||grad_W (a_i L_i)|| / |a_i|, which spares a pass over the gradients.
        """
        task_losses = task_losses.detach().to(self.weights.dtype)
        if coefficients is not None:
            if last and self._sums is None and self._sync_group() is None:
                self._step_from(task_losses, norms=gradient_norms(grads) / coefficients.abs())
                return
            grads = [g / coefficients.to(g.dtype).view(-1, *[1] * (g.dim() - 1)) for g in grads]
        if self._sums is None:
            self._sums = (task_losses, grads, 1)
        else:
            losses, sums, count = self._sums
            self._sums = (losses + task_losses, [a + b for a, b in zip(sums, grads)], count + 1)
        if last:
            losses, sums, count = self._sums
            self._sums = None
            if count > 1:
                losses, sums = losses / count, [g / count for g in sums]
            self._step_from(losses, sums)

    def _sync_group(self) -> dist.ProcessGroup | None:
        group = resolve_group(self.process_group, self.sync)
        if group is not None and group not in self._checked_groups:
            check_same_tasks(self.number_of_tasks, sum(p.numel() for p in self._shared),
                             process_group=group, device=self.weights.device)
            self._checked_groups.add(group)
        return group

    def _step_from(self, task_losses: Tensor, grads: list[Tensor] | None = None, *,
                   norms: Tensor | None = None) -> None:
        """One update from this window's L_i and either grad_W L_i or their norms."""
        if norms is None:
            assert grads is not None
            state, self.aux = step_from_gradients(self.state, task_losses, grads,
                                                  process_group=self._sync_group(),
                                                  batch_size=self.local_batch_size)
        else:
            state, self.aux = step_from_norms(self.state, task_losses, norms)
        self._set_state(state)
        self._warn_later(state, self.aux)

    def _warn_later(self, state: GradNormState, aux: GradNormAux) -> None:
        """On CUDA, where reading the skip flag would sync, copy its summary to the host
        asynchronously and warn once the copy has landed (the core warns on the CPU)."""
        done = [bool(event.query())  # type: ignore[no-untyped-call, unused-ignore]
                for event, _ in self._deferred]
        ready = [summary for (_, summary), landed in zip(self._deferred, done) if landed]
        self._deferred = [item for item, landed in zip(self._deferred, done) if not landed]
        for summary in ready:
            message = skip_message(summary)
            if message is not None:
                warnings.warn(message, SkippedUpdateWarning, stacklevel=3)
        if state.skipped.device.type == "cuda" and not readable(state.skipped):
            summary = skip_summary(state, aux).to("cpu", non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call, unused-ignore]
            event.record()
            self._deferred.append((event, summary))

    # ------------------------------------------------------------------ per-task gradients
    def _gradients_now(self, L_i: Tensor, records: list[Record]) -> list[Tensor]:
        """grad_W L_i for every task while L_i's graph is alive: from the forks, else from
        one backward per task (a batched backward would hold T copies of every cotangent)."""
        try:
            grads = self._fork.gradients_now(L_i, records) if records else None
            if grads is None:  # one backward per task: each walks only what its loss uses
                per_task = [torch.autograd.grad(loss, self._shared, retain_graph=True,
                                                allow_unused=True) for loss in L_i.unbind()]
                unused = [name for k, name in enumerate(self._fork.names)
                          if all(found[k] is None for found in per_task)]
                if unused:
                    raise ValueError(f"the task losses do not depend on shared parameter(s) "
                                     f"{unused}: pass the last layer that every task uses")
                grads = stack_tasks(per_task, self._shared)
        except RuntimeError as error:
            if FREED_GRAPH not in str(error):
                raise
            raise RuntimeError(
                "GradNorm needs the graph of L_i, but a backward has already freed it. Use "
                "loss = gradnorm(L_i) before loss.backward() (one line, no retain_graph), or "
                "call gradnorm.step(L_i) before loss.backward()") from None
        return grads

    def _require_graph(self, L_i: Tensor) -> None:
        if not L_i.requires_grad:
            raise ValueError("L_i has no autograd graph: compute it from the model's outputs, "
                             "with grad enabled (in evaluation, call gradnorm.eval() or use "
                             "torch.no_grad(), and gradnorm(L_i) only weights the losses)")

    def _check_losses(self, L_i: Tensor) -> Tensor:
        check_task_vector("L_i", L_i, self.number_of_tasks)
        self._follow_layer()
        self._check_buffers()
        return L_i

    # ------------------------------------------------------------------ the flows
    def forward(self, L_i: Tensor) -> Tensor:
        """sum_i w_i(t) L_i, and this step's GradNorm update, applied when its backward ends.

        Args:
            L_i: Tensor[T] of this (micro-)batch's task losses, each a mean over the batch.

        Returns:
            The balanced loss, a 0-d tensor, to call ``.backward()`` on (or return to the
            framework that does).
        """
        loss = (self.weights * self._check_losses(L_i)).sum()
        if not (self.training and torch.is_grad_enabled()):
            return loss
        self._require_graph(L_i)
        if self._last_losses is not None and self._last_losses() is L_i:
            raise RuntimeError("gradnorm(L_i) was already called on these losses: call it once "
                               "per (micro-)batch and reuse the loss it returned (log with "
                               "gradnorm.metrics())")
        self._last_losses = weakref.ref(L_i)
        due, last = self._advance()
        records = self._fork.take(used=due)
        if due:
            ticket = _Ticket(L_i.detach(), records, last)
            if records:
                for record in records:
                    record.armed = True
            else:
                ticket.grads = self._gradients_now(L_i, [])
            L_i.register_hook(  # type: ignore[no-untyped-call]
                partial(self._on_loss_gradient, ticket))
        return loss

    def _on_loss_gradient(self, ticket: _Ticket, grad: Tensor) -> None:
        if ticket.coefficients is None:  # a second backward through the same graph adds nothing
            ticket.coefficients = grad.detach()
            torch.autograd.Variable._execution_engine.queue_callback(
                partial(self._after_backward, ticket))

    def _after_backward(self, ticket: _Ticket) -> None:
        grads = ticket.grads
        if ticket.records:
            found = [self._fork.gradients(record) for record in ticket.records]
            reached = [g for g in found if g is not None]
            if not reached:
                raise RuntimeError("the backward reached L_i but not the fork of the heads "
                                   "(heads= or gradnorm.fork) of the forward before it: compute "
                                   "L_i from the heads that read the fork")
            grads = reached[0] if len(reached) == 1 else [sum(g) for g in zip(*reached)]
            assert ticket.coefficients is not None
        assert grads is not None
        with torch.no_grad():
            self._accumulate(ticket.task_losses, grads, ticket.last,
                             ticket.coefficients if ticket.records else None)

    def step(self, L_i: Tensor) -> Tensor:
        """One GradNorm step from this step's task losses, while their graph is alive.

        Compute the training loss with ``w_i`` *before* calling this (Algorithm 1 updates the
        network with w(t)), then call ``loss.backward()``. Returns the new ``w_i``.
        """
        self._require_graph(self._check_losses(L_i))
        due, last = self._advance()
        records = self._fork.take(used=due)
        if due:
            self._accumulate(L_i, self._gradients_now(L_i, records), last)
        return self.w_i

    def gradnorm(self, L_i: Tensor) -> Tensor:
        """L_grad for this step (seed API), differentiable with respect to the weights only.

        Pass the result to :meth:`apply_grads`.
        """
        if self.accumulation_steps > 1 or self.update_every > 1:
            raise ValueError("gradnorm()/apply_grads() make one update per call: with "
                             "accumulation_steps or update_every, use loss = gradnorm(L_i) "
                             "or gradnorm.step(L_i)")
        self._require_graph(self._check_losses(L_i))
        self._advance()
        grads = self._gradients_now(L_i, self._fork.take())
        task_losses, norms = global_norms(L_i.detach(), grads, process_group=self._sync_group(),
                                          batch_size=self.local_batch_size)
        state = self.state._replace(weights=self.weights.detach().requires_grad_(True))
        aux, _ = gradnorm_statistics(state, task_losses, norms)
        self._pending = (state.weights, aux)
        return loss_grad_from(state, aux)

    def apply_grads(self, L_grad: Tensor, lr: float | None = None) -> Tensor:
        """Updates the weights from the L_grad of :meth:`gradnorm`; returns the new ``w_i``.

        Args:
            L_grad: the value :meth:`gradnorm` returned for this step.
            lr: a learning rate for this update only; the configured one otherwise.
        """
        if self._pending is None:
            raise RuntimeError("apply_grads needs the L_grad of a preceding gradnorm(L_i) call")
        weights, aux = self._pending
        self._pending = None
        (grads,) = torch.autograd.grad(L_grad, weights)
        state = self.state
        if lr is not None:
            lr = check_real("lr", lr, low=0.0, low_inclusive=False)
            check_held("lr", lr, state.weights.dtype, low=0.0, low_inclusive=False)
            new_lr = torch.full_like(state.hyper.lr, lr)
            state = state._replace(hyper=state.hyper._replace(lr=new_lr))
        new_state = update(state, grads, aux=aux)._replace(hyper=self.state.hyper)
        self._set_state(new_state)
        self.aux = aux
        self._warn_later(new_state, aux)
        return self.w_i

    def fork(self, z: Tensor) -> Tensor:
        """z expanded to [T, *z.shape] (a view), for the heads: slice i must feed task i only.

        Call it in the model's forward where the shared representation z forks into the
        heads, e.g. ``torch.vmap(head)(z_t)`` for stacked heads or
        ``[head(v) for head, v in zip(heads, z_t.unbind(0))]``. This enables the fast path.
        """
        return self._fork.expand(z)

    def metrics(self, prefix: str = "gradnorm/") -> dict[str, Tensor]:
        """The weights, the latest norms, ratios and L_grad, and the update counts, as a flat
        dict of detached 0-d tensors for ``self.log_dict``, TensorBoard or W&B. No sync."""
        dtype = self.weights.dtype
        out = {f"{prefix}w_{i}": w for i, w in enumerate(self.weights.detach().unbind())}
        if self.aux is not None:
            for name, values in (("grad_norm", self.aux.grad_norms),
                                 ("loss_ratio", self.aux.loss_ratios)):
                out.update({f"{prefix}{name}_{i}": v for i, v in enumerate(values.unbind())})
            out[f"{prefix}loss_grad"] = self.aux.loss_grad
        out[f"{prefix}updates"] = self.update_count.to(dtype)
        out[f"{prefix}skipped_updates"] = self.skipped_count.to(dtype)
        return out

    def extra_repr(self) -> str:
        return (f"number_of_tasks={self.number_of_tasks}, "
                f"accumulation_steps={self.accumulation_steps}, update_every={self.update_every}")
