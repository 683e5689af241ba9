"""GradNorm's state: an immutable pytree of tensors, and its constructor."""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, Sequence, Union

import torch
from torch import Tensor

Optimizer = Literal["sgd", "adam"]
LossesLike = Union[Tensor, Sequence[float]]


class GradNormHyperParams(NamedTuple):
    """Hyper-parameters, held as 0-d tensors so that changing one never recompiles."""

    alpha: Tensor  # [] float: exponent of the restoring force r_i^alpha
    lr: Tensor  # [] float: learning rate of the task weights
    warmup_steps: Tensor  # [] float: linear learning-rate warm-up length; 0 disables it
    use_adam: Tensor  # [] bool: Adam when True, plain gradient descent when False
    beta1: Tensor  # [] float: Adam's first-moment decay
    beta2: Tensor  # [] float: Adam's second-moment decay
    eps: Tensor  # [] float: Adam's denominator offset
    min_weight: Tensor  # [] float: floor applied before renormalising to sum T


class GradNormState(NamedTuple):
    """Everything the next GradNorm step needs. Never mutated: each step returns a new one.

    A ``NamedTuple`` of tensors is a pytree for ``torch.func``, ``torch.compile`` and
    ``optree`` without registration. Save it with ``torch.save(state_to_dict(state), path)``
    and restore it with ``state_from_dict(torch.load(path))``.
    """

    weights: Tensor  # [T] float: task weights w_i(t), positive, summing to T
    initial_losses: Tensor  # [T] float: L_i(0); NaN until the first finite step records it
    update_count: Tensor  # [] int64: number of weight updates applied (skipped steps excluded)
    exp_avg: Tensor  # [T] float: Adam's first moment of dL_grad/dw (zero under SGD)
    exp_avg_sq: Tensor  # [T] float: Adam's second moment of dL_grad/dw (zero under SGD)
    hyper: GradNormHyperParams


def check_num_tasks(num_tasks: int) -> None:
    """Raises ``ValueError`` unless ``num_tasks`` is an integer T >= 1."""
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be an integer >= 1, got {num_tasks!r}")


def check_real(name: str, value: float, *, low: float, high: float = math.inf,
               low_inclusive: bool = True, high_inclusive: bool = False) -> float:
    """``float(value)``; raises naming ``name`` unless it is a finite real within the bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    above = value >= low if low_inclusive else value > low
    below = value <= high if high_inclusive else value < high
    if not (math.isfinite(value) and above and below):
        lo = "[" if low_inclusive else "("
        hi = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must be finite and in {lo}{low}, {high}{hi}, got {value!r}")
    return float(value)


def init_state(
    num_tasks: int,
    *,
    alpha: float = 1.5,
    lr: float = 0.025,
    optimizer: Optimizer = "adam",
    warmup_steps: int = 0,
    initial_losses: LossesLike | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    min_weight: float = 1e-3,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> GradNormState:
    """Creates the state of T = ``num_tasks`` tasks with all weights w_i(0) = 1.

    Args:
        num_tasks: number of tasks T >= 1.
        alpha: exponent of the restoring force; 0 equalises the gradient norms. The paper
            uses 0.12 on its toy problem and 1.5 on NYUv2 (Chen et al. 2018, Sec. 4-5).
        lr: learning rate of the weights. The paper trains them with Adam at 0.025.
        optimizer: ``"adam"`` (the paper's choice) or ``"sgd"`` (w <- w - lr * dL_grad/dw).
        warmup_steps: the learning rate ramps linearly, lr * min(1, t / warmup_steps) at
            update t = 1, 2, ...; 0 disables the ramp.
        initial_losses: L_i(0) of shape [T], all positive, e.g. log(C) for a C-class
            cross-entropy. When omitted, the losses of the first finite step are used.
        betas: Adam's moment decays.
        eps: Adam's denominator offset.
        min_weight: each updated weight is raised to at least this floor, *then* all are
            rescaled to sum T, so every weight stays positive and the sum is exactly T.
        dtype: floating dtype of the weights, losses and moments.
        device: device of every tensor in the state.

    Raises:
        ValueError: naming the bad value.
    """
    check_num_tasks(num_tasks)
    alpha = check_real("alpha", alpha, low=0.0)
    lr = check_real("lr", lr, low=0.0, low_inclusive=False)
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair, got {betas!r}")
    beta1 = check_real("betas[0]", betas[0], low=0.0, high=1.0)
    beta2 = check_real("betas[1]", betas[1], low=0.0, high=1.0)
    eps = check_real("eps", eps, low=0.0, low_inclusive=False)
    min_weight = check_real("min_weight", min_weight, low=0.0, high=1.0,
                             low_inclusive=False, high_inclusive=True)
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype!r}")

    def scalar(value: float | bool) -> Tensor:
        return torch.tensor(value, dtype=torch.bool if isinstance(value, bool) else dtype,
                            device=device)

    if initial_losses is None:
        initial = torch.full((num_tasks,), math.nan, dtype=dtype, device=device)
    else:
        initial = torch.as_tensor(initial_losses).detach().to(dtype=dtype, device=device).clone()
        if initial.shape != (num_tasks,):
            raise ValueError(f"initial_losses must have shape ({num_tasks},), "
                             f"got {tuple(initial.shape)}")
        if not bool(torch.isfinite(initial).all() and (initial > 0).all()):
            raise ValueError(f"initial_losses must be finite and positive, got {initial.tolist()}")
    zeros = torch.zeros(num_tasks, dtype=dtype, device=device)
    return GradNormState(
        weights=torch.ones(num_tasks, dtype=dtype, device=device),
        initial_losses=initial,
        update_count=torch.zeros((), dtype=torch.int64, device=device),
        exp_avg=zeros,
        exp_avg_sq=zeros.clone(),
        hyper=GradNormHyperParams(
            alpha=scalar(alpha),
            lr=scalar(lr),
            warmup_steps=scalar(float(warmup_steps)),
            use_adam=scalar(optimizer == "adam"),
            beta1=scalar(beta1),
            beta2=scalar(beta2),
            eps=scalar(eps),
            min_weight=scalar(min_weight),
        ),
    )


def state_to(state: GradNormState, device: torch.device | str) -> GradNormState:
    """``state`` with every tensor detached and moved to ``device``."""
    hyper = GradNormHyperParams(*(t.detach().to(device) for t in state.hyper))
    fields = {name: getattr(state, name).detach().to(device)
              for name in GradNormState._fields if name != "hyper"}
    return GradNormState(**fields, hyper=hyper)


def state_to_dict(state: GradNormState) -> dict[str, Tensor]:
    """Flattens ``state`` into a ``{name: tensor}`` dict for ``torch.save`` or a checkpoint."""
    flat = {name: value for name, value in state._asdict().items() if name != "hyper"}
    flat.update({f"hyper.{name}": value for name, value in state.hyper._asdict().items()})
    return flat


def state_from_dict(flat: dict[str, Tensor]) -> GradNormState:
    """Inverse of :func:`state_to_dict`; raises ``KeyError`` naming a missing entry."""
    hyper = GradNormHyperParams(*(flat[f"hyper.{name}"] for name in GradNormHyperParams._fields))
    fields = {name: flat[name] for name in GradNormState._fields if name != "hyper"}
    return GradNormState(**fields, hyper=hyper)
