"""The wrapper's fast path: per-task gradients at W captured at the fork of the heads.

Each head consumes its own view of the shared representation z (``GradNorm.fork(z)`` or
``GradNorm(..., heads=...)``), so the backward of the training loss sum_i w_i L_i sends each
task's cotangent c_i = w_i dL_i/dz to its own view. A tensor hook takes the T cotangents
during that backward and, before the graph below z is freed, one batched vjp of the
segment between W and z turns them into grad_W (w_i L_i); dividing by w_i > 0 gives
grad_W L_i. No work grows with T times the number of heads.

When GradNorm is asked before any backward ran, the cotangents come from one backward of
sum_i L_i through the heads only (the graph is retained for the caller's backward).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import torch
from torch import Tensor, nn


_CHUNK_ELEMENTS = 1 << 18  # cotangent elements per batched vjp of the segment
_LOOP_TASKS = 4  # up to this many tasks, a vjp per task beats one batched vjp (measured)


class _Record:
    """One forward's fork: its source z, the per-task views, and what the backward left."""

    def __init__(self, source: Tensor, num_tasks: int) -> None:
        self.source: Tensor = source  # z, output of the shared segment
        self.stacked: Tensor | None = None  # z_t of shape [T, *z.shape] (``expand``)
        self.views: list[Tensor | None] = [None] * num_tasks  # what head i consumed (``attach``)
        self.cotangents: list[Tensor | None] = [None] * num_tasks  # w_i dL_i/dz
        self.grads: list[Tensor | None] | None = None  # grad_W (w_i L_i), each [T, *W.shape]


class TaskFork:
    """Per-task views of z for the heads, and grad_W L_i from the cotangents they receive.

    Args:
        params: the shared tensors W.
        num_tasks: T.
    """

    def __init__(self, params: Sequence[Tensor], num_tasks: int) -> None:
        self.params = list(params)
        self.num_tasks = num_tasks
        self._record: _Record | None = None

    def expand(self, z: Tensor) -> Tensor:
        """z_t = z expanded to [T, *z.shape] (a view, no copy); slice i must feed task i only."""
        z_t = z.expand(self.num_tasks, *z.shape)
        if not (torch.is_grad_enabled() and z.requires_grad):
            return z_t
        record = self._start(z)
        z_t.register_hook(partial(self._on_stacked, record))  # type: ignore[no-untyped-call]
        record.stacked = z_t
        return z_t

    def attach(self, heads: Sequence[nn.Module]) -> list[torch.utils.hooks.RemovableHandle]:
        """Forward-pre-hooks giving head i its own view of its first input z, one per task."""
        if len(heads) != self.num_tasks:
            raise ValueError(f"heads must hold one module per task ({self.num_tasks}), "
                             f"got {len(heads)}")
        return [head.register_forward_pre_hook(partial(self._head_input, i))
                for i, head in enumerate(heads)]

    def _start(self, z: Tensor) -> _Record:
        self._record = _Record(z, self.num_tasks)
        return self._record

    def _head_input(self, task: int, _: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        z = args[0] if args else None
        if not (isinstance(z, Tensor) and torch.is_grad_enabled() and z.requires_grad):
            return None
        record = self._record
        if record is None or record.source is not z or record.views[task] is not None:
            record = self._start(z)
            z.register_hook(partial(self._on_source, record))  # type: ignore[no-untyped-call]
        view = z.view_as(z)
        view.register_hook(partial(self._on_view, record, task))  # type: ignore[no-untyped-call]
        record.views[task] = view
        return (view, *args[1:])

    def _on_view(self, record: _Record, task: int, grad: Tensor) -> None:
        record.cotangents[task] = grad

    def _on_source(self, record: _Record, _: Tensor) -> None:
        # Cleared first: the vjp below runs z's node again, and with it this hook.
        cotangents, record.cotangents = record.cotangents, [None] * self.num_tasks
        if record is self._record and any(c is not None for c in cotangents):
            record.grads = self._segment_grads(record, cotangents)

    def _on_stacked(self, record: _Record, grad: Tensor) -> None:
        if record is self._record:
            record.grads = self._segment_grads(record, grad)

    def _segment_grads(self, record: _Record, cotangents: Tensor | list[Tensor | None]
                       ) -> list[Tensor | None]:
        """The segment's vjp at W for each of the T cotangents at z (stacked, or one per task).

        Up to ``_LOOP_TASKS`` tasks, or when one task's cotangent alone fills a chunk of
        ``_CHUNK_ELEMENTS`` elements, one plain vjp per task: no stacked copy of the
        cotangents, no batching overhead, and a task whose loss skips the fork costs nothing.
        Otherwise one batched vjp (``is_grads_batched``) per chunk of tasks, so that the
        backward never holds many copies of a large activation. A parameter that z does not
        depend on gets None.
        """
        present = next((c for c in cotangents if c is not None), None)
        if present is None:
            raise ValueError("the task losses do not depend on the fork of the heads")
        chunk = max(1, _CHUNK_ELEMENTS // max(1, present.numel()))
        if chunk == 1 or self.num_tasks <= _LOOP_TASKS:
            return self._grads_per_task(record, cotangents)
        stacked = cotangents if isinstance(cotangents, Tensor) else torch.stack(
            [torch.zeros_like(present) if c is None else c for c in cotangents])
        parts = [torch.autograd.grad(record.source, self.params, grad_outputs=c,
                                     is_grads_batched=True, retain_graph=True, allow_unused=True)
                 for c in torch.split(stacked, chunk)]
        return [None if grads[0] is None else torch.cat(grads) if len(grads) > 1 else grads[0]
                for grads in zip(*parts)]

    def _grads_per_task(self, record: _Record, cotangents: Tensor | list[Tensor | None]
                        ) -> list[Tensor | None]:
        """One plain vjp of the segment per task; each cotangent is released once used."""
        pending: list[Tensor | None] = (list(cotangents.unbind(0)) if isinstance(cotangents, Tensor)
                                        else cotangents)
        per_task: list[list[Tensor | None]] = []
        for task in range(self.num_tasks):
            c, pending[task] = pending[task], None
            per_task.append([None] * len(self.params) if c is None else list(torch.autograd.grad(
                record.source, self.params, grad_outputs=c, retain_graph=True, allow_unused=True)))
        return [None if all(g is None for g in grads)
                else torch.stack([torch.zeros_like(p) if g is None else g for g in grads])
                for p, grads in zip(self.params, zip(*per_task))]

    def per_task_grads(self, L_i: Tensor, weights: Tensor) -> list[Tensor | None] | None:
        """grad_W L_i stacked on a task axis, from the last forward's fork; None without a fork.

        After the caller's backward of sum_i w_i L_i (``weights`` = the w_i it used), the
        grad_W (w_i L_i) captured by the latest backward through the fork are divided by w_i. Before it, the cotangents come from one
        backward of sum_i L_i through the heads, with the graph retained. The fork is used
        once: the next call needs a new forward. A parameter that z does not depend on gets None.
        """
        record, self._record = self._record, None
        if record is None:
            return None
        if record.grads is not None:
            return [None if g is None else g / weights.to(g.dtype).view(-1, *[1] * (g.dim() - 1))
                    for g in record.grads]
        views = [record.stacked] if record.stacked is not None else record.views
        used = [v for v in views if v is not None]
        found = iter(torch.autograd.grad(L_i, used, grad_outputs=torch.ones_like(L_i),
                                         retain_graph=True, allow_unused=True))
        cotangents = [None if v is None else next(found) for v in views]
        stacked = cotangents[0] if record.stacked is not None else None
        return self._segment_grads(record, cotangents if stacked is None else stacked)
