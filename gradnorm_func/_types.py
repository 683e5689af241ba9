"""The type aliases of the package, in one place."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Literal, Sequence, Union

from torch import Tensor, nn

Params = Any  # a pytree of tensors (a dict, list, tuple or NamedTuple of them, or one tensor)
LossesFn = Callable[[Params], Tensor]  # shared parameters -> Tensor[T] of per-task losses
Segment = Callable[[Params, Tensor], Tensor]  # (shared parameters, h) -> z, the fork
BatchSize = Union[int, Tensor, None]  # a rank's local batch size n_r; None weights ranks equally
Optimizer = Literal["sgd", "adam"]
TaskVectorLike = Union[Tensor, Sequence[float]]  # T numbers, one per task
SharedLayer = Union[nn.Module, Tensor, Iterable[Tensor]]  # what GradNorm norms: W
ClosedFormLayer = Union[nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d]  # W in closed form
