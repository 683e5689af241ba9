"""The wrapper's fast path: per-task gradients at W from the cotangents at the fork of the heads.

Each head consumes its own view of the shared representation z (``GradNorm.fork(z)`` or
``GradNorm(..., heads=...)``). Every forward through the fork leaves a *record* (z, the
views, and the shared layer's input when the closed form applies). The backward of a loss
sum_i a_i L_i then sends each task's cotangent c_i = a_i dL_i/dz to its own view, and the
segment between W and z turns the T cotangents into grad_W (a_i L_i): in closed form for a
Linear or ConvNd layer (:mod:`gradnorm_func._segments`), else by one vjp of the segment.

A record is used in one of two ways:

* *armed* by ``GradNorm.forward``: tensor hooks take the cotangents during the caller's own
  backward, while the graph below z is alive. The hook on stacked views computes the
  gradients at once; the hook on a separate head's view does so for a ConvNd or generic
  segment, and for a Linear layer keeps the cotangent, so that all T gradients are one
  batched matmul once the backward has ended (:meth:`TaskFork.gradients`);
* by ``GradNorm.step`` before the backward: one backward of sum_i L_i through the heads
  only, with the graph retained, gives the cotangents (:meth:`TaskFork.gradients_now`).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from gradnorm_func._segments import (
    LayerCall,
    activation_derivative,
    closed_form_layer,
    elementwise_activation,
    is_relu,
    layer_gradients,
    linear_task_gradients,
)

_LOOP_TASKS = 4  # up to this many tasks, one vjp per task beats one batched vjp (measured)
_CHUNK_ELEMENTS = 1 << 18  # cotangent elements per batched vjp of a generic segment
_ALL_HEADS_ELEMENTS = 1 << 22  # step-first: the most cotangent elements of separate heads
# taken in one backward; above it, one backward per head, one cotangent alive at a time
_MAX_PENDING = 8  # records kept for a later GradNorm call; older ones are stale
FREED_GRAPH = "backward through the graph a second time"  # torch's message, to replace


def stack_tasks(per_task: Sequence[Sequence[Tensor | None] | None],
                params: Sequence[Tensor]) -> list[Tensor]:
    """Per parameter p, the [T, *p.shape] stack of the tasks' gradients, with zeros for a task
    (or one of its entries) that has none."""
    return [torch.stack([torch.zeros_like(p) if g is None else g
                         for g in (None if grads is None else grads[k] for grads in per_task)])
            for k, p in enumerate(params)]


class Record:
    """One forward's fork: z, the per-task views, and the gradients a backward computed."""

    def __init__(self, source: Tensor, num_tasks: int, closed_form: LayerCall | None,
                 activation: torch.autograd.graph.Node | None) -> None:
        self.source: Tensor | None = source  # z, output of the shared segment
        self.stacked: Tensor | None = None  # z_t of shape [T, *z.shape] (``expand``)
        self.views: list[Tensor | None] = [None] * num_tasks  # what head i consumed (``attach``)
        self.closed_form = closed_form  # the layer call, when z = f(layer(h)) in closed form
        self.activation = activation  # f's autograd node, or None when z = layer(h)
        self.derivative: Tensor | None = None  # f'(y), once a backward has asked for it
        self.armed = False  # compute the gradients during the next backward through the fork
        self.grads: list[Tensor] | None = None  # grad_W (a_i L_i), each [T, *W.shape]
        self.task_grads: list[list[Tensor] | None] = [None] * num_tasks  # per view, as they come
        self.cotangents: list[Tensor | None] = [None] * num_tasks  # per view, kept for one bmm

    def release(self) -> None:
        """Drops the tensors: the hooks on the views keep the record until the graph goes."""
        self.source, self.stacked, self.closed_form = None, None, None
        self.derivative, self.grads = None, None
        self.views = [None] * len(self.views)
        self.task_grads = [None] * len(self.task_grads)
        self.cotangents = [None] * len(self.cotangents)
        self.armed = False


class TaskFork:
    """Per-task views of z for the heads, and grad_W (a_i L_i) from the cotangents they receive.

    Args:
        layer: the shared layer, when it is a module (for the closed form), else None.
        named_params: the shared tensors W with their names (for error messages).
        num_tasks: T.
        recording: returns whether the next GradNorm step needs a record of this forward.
    """

    def __init__(self, layer: nn.Module | None, named_params: Sequence[tuple[str, Tensor]],
                 num_tasks: int, recording: Callable[[], bool]) -> None:
        self.names = [name for name, _ in named_params]
        self.params = [p for _, p in named_params]
        self.num_tasks = num_tasks
        self.recording = recording
        self.pending: list[Record] = []
        self._layer = closed_form_layer(layer, self.params)
        self._layer_calls: list[LayerCall] = []  # calls of the layer since the last record
        if self._layer is not None:
            self._layer.register_forward_hook(self._on_layer)

    # ----------------------------------------------------------------- forward: records
    def _active(self, z: object) -> bool:
        return (isinstance(z, Tensor) and z.requires_grad and torch.is_grad_enabled()
                and self.recording())

    def _on_layer(self, _: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if args and isinstance(output, Tensor) and self._active(output):
            self._layer_calls.append(LayerCall(args[0], output.grad_fn))  # type: ignore[arg-type]

    def _new_record(self, z: Tensor) -> Record:
        call = self._layer_calls[0] if len(self._layer_calls) == 1 else None
        self._layer_calls = []  # the closed form needs z to come from exactly one layer call
        closed, activation = elementwise_activation(z, call) if call is not None else (False, None)
        record = Record(z, self.num_tasks, call if closed else None, activation)
        for stale in self.pending[:1 - _MAX_PENDING]:
            stale.release()
        self.pending = [*self.pending[1 - _MAX_PENDING:], record]
        return record

    def expand(self, z: Tensor) -> Tensor:
        """z_t = z expanded to [T, *z.shape] (a view, no copy); slice i must feed task i only."""
        z_t = z.expand(self.num_tasks, *z.shape)
        if self._active(z):
            record = self._new_record(z)
            record.stacked = z_t
            z_t.register_hook(partial(self._on_stacked, record))  # type: ignore[no-untyped-call]
        return z_t

    def attach(self, heads: Sequence[nn.Module]) -> None:
        """Forward-pre-hooks giving head i its own view of its first input z, one per task."""
        if isinstance(heads, nn.Module) and not isinstance(heads, (nn.ModuleList, nn.Sequential)):
            raise TypeError("heads must be a sequence of modules, one per task (e.g. an "
                            f"nn.ModuleList), got {type(heads).__name__}")
        heads = list(heads)
        if len(heads) != self.num_tasks or not all(isinstance(h, nn.Module) for h in heads):
            raise ValueError(f"heads must hold one nn.Module per task ({self.num_tasks}), "
                             f"got {[type(h).__name__ for h in heads]}")
        for i, head in enumerate(heads):
            head.register_forward_pre_hook(partial(self._head_input, i))

    def _head_input(self, task: int, _: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        z = args[0] if args else None
        if not self._active(z):
            return None
        assert isinstance(z, Tensor)
        record = self.pending[-1] if self.pending else None
        if record is None or record.source is not z or record.stacked is not None:
            record = self._new_record(z)
        elif record.views[task] is not None:
            raise RuntimeError(
                f"head {task} was called twice on the same shared representation in one "
                "forward; with heads=, each head must read z once. Call it once, or feed the "
                "heads from z_t = gradnorm.fork(z) and index z_t[i] for each use")
        view = z.view_as(z)
        view.register_hook(partial(self._on_view, record, task))  # type: ignore[no-untyped-call]
        record.views[task] = view
        return (view, *args[1:])

    def take(self, used: bool = True) -> list[Record]:
        """The records of the forwards since the last call, for one GradNorm step; released
        at once when the step does not use them."""
        records, self.pending = self.pending, []
        self._layer_calls = []
        if not used:
            for record in records:
                record.release()
            return []
        return records

    # ----------------------------------------------------------------- backward: hooks
    def _on_view(self, record: Record, task: int, grad: Tensor) -> None:
        if record.armed:
            self._receive(record, task, grad)

    def _receive(self, record: Record, task: int, cotangent: Tensor) -> None:
        """Takes head ``task``'s cotangent at its view of z: kept for one batched matmul over
        the tasks when the layer is Linear in closed form and the T cotangents hold at most
        ``_ALL_HEADS_ELEMENTS`` elements, else turned into that task's gradient at once."""
        assert record.source is not None
        if (self._linear_closed_form(record)
                and record.source.numel() * self.num_tasks <= _ALL_HEADS_ELEMENTS):
            if record.activation is not None and not is_relu(record.activation):
                self._derivative(record)  # f's node is freed before the cotangents are used
            record.cotangents[task] = cotangent
        else:
            record.task_grads[task] = self._task_gradient(record, cotangent)

    def _on_stacked(self, record: Record, grad: Tensor) -> None:
        if record.armed:
            record.armed = False
            record.grads = self._stacked_gradients(record, grad)

    def gradients(self, record: Record) -> list[Tensor] | None:
        """What the backward left in ``record``: grad_W (a_i L_i) stacked on a task axis (zero
        for a head the backward did not reach), or None when it reached no head."""
        kept = [(task, c) for task, c in enumerate(record.cotangents) if c is not None]
        if kept:
            found = self._stacked_gradients(record, torch.stack([c for _, c in kept]))
            if len(kept) == self.num_tasks:
                record.grads = found
            else:
                for row, (task, _) in enumerate(kept):
                    record.task_grads[task] = [g[row] for g in found]
        grads, task_grads = record.grads, record.task_grads
        record.release()
        if grads is not None or all(g is None for g in task_grads):
            return grads
        return stack_tasks(task_grads, self.params)

    # ----------------------------------------------------------------- the segment
    def _through_activation(self, record: Record, cotangents: Tensor) -> Tensor:
        """c * f'(y): the cotangents at z carried back to the layer's output y (broadcast
        over a leading task axis)."""
        if record.activation is None:
            return cotangents
        assert record.source is not None
        if is_relu(record.activation):
            masked: Tensor = torch.ops.aten.threshold_backward(cotangents, record.source, 0)
            return masked
        return cotangents * self._derivative(record)

    def _derivative(self, record: Record) -> Tensor:
        """f'(y), computed once, while f's node still holds its saved tensors (during the
        backward that reaches the fork, or before it)."""
        if record.derivative is None:
            assert record.source is not None and record.activation is not None
            record.derivative = activation_derivative(record.source, record.activation)
        return record.derivative

    def _linear_closed_form(self, record: Record) -> bool:
        """Whether ``record``'s T gradients are one batched matmul: a Linear layer whose
        output, or an elementwise activation of it, is z."""
        return record.closed_form is not None and isinstance(self._layer, nn.Linear)

    def _task_gradient(self, record: Record, cotangent: Tensor) -> list[Tensor]:
        """One task's grad_W (a_i L_i) from its cotangent c_i at z: closed form, or one vjp."""
        if record.closed_form is None:
            return self._vjp(record, cotangent, batched=False)
        assert self._layer is not None
        return layer_gradients(self._layer, record.closed_form.inputs,
                               self._through_activation(record, cotangent))

    def _stacked_gradients(self, record: Record, cotangents: Tensor) -> list[Tensor]:
        """grad_W (a_i L_i) for the T cotangents stacked as [T, *z.shape], each [T, *W.shape].

        A Linear layer takes one batched matmul; a ConvNd one weight-gradient convolution per
        task. A generic segment takes one plain vjp per task up to ``_LOOP_TASKS`` tasks or
        when one task's cotangent fills a chunk of ``_CHUNK_ELEMENTS``, otherwise one batched
        vjp per chunk of tasks, so that it never holds many copies of a large activation.
        """
        if self._linear_closed_form(record):
            assert isinstance(self._layer, nn.Linear) and record.closed_form is not None
            return linear_task_gradients(self._layer, record.closed_form.inputs,
                                         self._through_activation(record, cotangents))
        chunk = max(1, _CHUNK_ELEMENTS // max(1, cotangents[0].numel()))
        if record.closed_form is not None or chunk == 1 or self.num_tasks <= _LOOP_TASKS:
            per_task = [self._task_gradient(record, c) for c in cotangents.unbind(0)]
            return [torch.stack(grads) for grads in zip(*per_task)]
        parts = [self._vjp(record, c, batched=True) for c in torch.split(cotangents, chunk)]
        return [torch.cat(grads) if len(grads) > 1 else grads[0] for grads in zip(*parts)]

    def _vjp(self, record: Record, cotangent: Tensor, *, batched: bool) -> list[Tensor]:
        assert record.source is not None
        grads = torch.autograd.grad(record.source, self.params, grad_outputs=cotangent,
                                    is_grads_batched=batched, retain_graph=True,
                                    allow_unused=True)
        unused = [name for name, g in zip(self.names, grads) if g is None]
        if unused:
            raise ValueError(f"the fork of the heads does not depend on shared parameter(s) "
                             f"{unused}: pass the layer that produces the representation the "
                             "heads read")
        return [g for g in grads if g is not None]

    # ----------------------------------------------------------------- before the backward
    def gradients_now(self, L_i: Tensor, records: list[Record]) -> list[Tensor] | None:
        """grad_W L_i for every task, [T, *W.shape] per parameter, from ``records``' forks.

        Backwards through the heads only, with the graph retained: one for stacked heads; for
        separate heads one for all of them, or one per head when their cotangents would hold
        more than ``_ALL_HEADS_ELEMENTS`` elements; then the segment at each fork that L_i
        reaches. None when L_i reaches none of them.
        """
        total: list[Tensor] | None = None
        for record in records:
            if record.stacked is not None:
                (cotangents,) = torch.autograd.grad(L_i, record.stacked,
                                                    grad_outputs=torch.ones_like(L_i),
                                                    retain_graph=True, allow_unused=True)
                if cotangents is not None:
                    record.grads = self._stacked_gradients(record, cotangents)
            else:
                views = [(task, view) for task, view in enumerate(record.views) if view is not None]
                assert record.source is not None
                found: Iterator[Tensor | None]
                if record.source.numel() * len(views) > _ALL_HEADS_ELEMENTS:
                    found = (torch.autograd.grad(L_i[task], view, retain_graph=True,
                                                 allow_unused=True)[0] for task, view in views)
                else:
                    found = iter(torch.autograd.grad(L_i, [v for _, v in views],
                                                     grad_outputs=torch.ones_like(L_i),
                                                     retain_graph=True, allow_unused=True))
                for (task, _), cotangent in zip(views, found):
                    if cotangent is not None:
                        self._receive(record, task, cotangent)
            grads = self.gradients(record)
            if grads is not None:
                total = grads if total is None else [a + b for a, b in zip(total, grads)]
        return total
