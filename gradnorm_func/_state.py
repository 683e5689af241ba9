"""GradNorm's state: an immutable pytree of tensors, its constructor and its checkpoint form."""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import torch
from torch import Tensor

from gradnorm_func._checks import (
    STATE_DTYPES,
    check_count,
    check_held,
    check_num_tasks,
    check_positive_vector,
    check_real,
    check_state_dtype,
)
from gradnorm_func._types import Optimizer, TaskVectorLike


# The ranges of the hyper-parameters, by the name init_state gives them.
HYPER_BOUNDS: dict[str, dict[str, Any]] = {
    "alpha": {"low": 0.0},
    "lr": {"low": 0.0, "low_inclusive": False},
    "warmup_steps": {"low": 0.0},
    "betas[0]": {"low": 0.0, "high": 1.0},
    "betas[1]": {"low": 0.0, "high": 1.0},
    "eps": {"low": 0.0, "low_inclusive": False},
    "sum of the initial weights": {"low": 0.0, "low_inclusive": False},
}
# The same, by the field of GradNormHyperParams.
FIELD_BOUNDS = {"alpha": "alpha", "lr": "lr", "warmup_steps": "warmup_steps", "beta1": "betas[0]",
                "beta2": "betas[1]", "eps": "eps", "weight_sum": "sum of the initial weights"}


class GradNormHyperParams(NamedTuple):
    """Hyper-parameters, held as 0-d tensors so that changing one never recompiles."""

    alpha: Tensor  # [] float: exponent of the restoring force r_i^alpha
    lr: Tensor  # [] float: learning rate of the task weights
    warmup_steps: Tensor  # [] float: linear learning-rate warm-up length; 0 disables it
    use_adam: Tensor  # [] bool: Adam when True, plain gradient descent when False
    beta1: Tensor  # [] float: Adam's first-moment decay
    beta2: Tensor  # [] float: Adam's second-moment decay
    eps: Tensor  # [] float: Adam's denominator offset
    min_weight: Tensor  # [] float: floor applied to each weight before renormalising
    weight_sum: Tensor  # [] float: S, the sum the weights are renormalised to (T by default)


class GradNormState(NamedTuple):
    """Everything the next GradNorm step needs. Never mutated: each step returns a new one.

    A ``NamedTuple`` of tensors is a pytree for ``torch.func`` and ``torch.compile`` without
    registration. Save it with ``torch.save(state_to_dict(state), path)`` and restore it
    with ``state_from_dict(torch.load(path))``.
    """

    weights: Tensor  # [T] float: task weights w_i(t), positive, summing to S
    initial_losses: Tensor  # [T] float: L_i(0); NaN until the first applied update records it
    update_count: Tensor  # [] int64: weight updates applied
    skipped_count: Tensor  # [] int64: weight updates skipped because an input or result was bad
    skipped: Tensor  # [] bool: the latest update was skipped
    exp_avg: Tensor  # [T] float: Adam's first moment of dL_grad/dw (zero under SGD)
    exp_avg_sq: Tensor  # [T] float: Adam's second moment of dL_grad/dw (zero under SGD)
    hyper: GradNormHyperParams


def init_state(
    num_tasks: int,
    *,
    alpha: float = 1.5,
    lr: float = 0.025,
    optimizer: Optimizer = "adam",
    warmup_steps: int = 0,
    initial_losses: TaskVectorLike | None = None,
    initial_weights: TaskVectorLike | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    min_weight: float = 1e-3,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> GradNormState:
    """Creates the state of T = ``num_tasks`` tasks, with w_i(0) = 1 or ``initial_weights``.

    The defaults are the paper's NYUv2 settings (Chen et al. 2018, Sec. 5): Adam at lr 0.025
    and alpha = 1.5.

    Args:
        num_tasks: number of tasks T >= 1.
        alpha: exponent of the restoring force; 0 equalises the gradient norms. The paper
            uses 0.12 on its toy problem and 1.5 on NYUv2.
        lr: learning rate of the weights.
        optimizer: ``"adam"`` or ``"sgd"`` (w <- w - lr * dL_grad/dw).
        warmup_steps: the learning rate ramps linearly, lr * min(1, t / warmup_steps) at
            update t = 1, 2, ...; 0 disables the ramp.
        initial_losses: L_i(0) of shape [T], all finite and positive, e.g. log(C) for a
            C-class cross-entropy. When omitted, the losses of the first applied update.
        initial_weights: w_i(0) of shape [T], all finite and positive (a warm start from
            hand-tuned weights). Every update renormalises the weights to their sum
            S = sum_i w_i(0) instead of T. All ones (sum T) is the paper's case.
        betas: Adam's moment decays, each in [0, 1).
        eps: Adam's denominator offset.
        min_weight: each updated weight is raised to at least this floor, *then* all are
            rescaled to sum S, so every weight stays positive and the sum is exactly S.
            It must be representable in ``dtype`` and at most the mean weight S / T.
        dtype: torch.float32 or torch.float64, for the weights, losses and moments.
        device: device of every tensor in the state.

    Raises:
        ValueError, TypeError: naming the bad value.
    """
    check_num_tasks(num_tasks)
    alpha = check_real("alpha", alpha, **HYPER_BOUNDS["alpha"])
    lr = check_real("lr", lr, **HYPER_BOUNDS["lr"])
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    check_count("warmup_steps", warmup_steps, low=0)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    beta1 = check_real("betas[0]", betas[0], **HYPER_BOUNDS["betas[0]"])
    beta2 = check_real("betas[1]", betas[1], **HYPER_BOUNDS["betas[1]"])
    eps = check_real("eps", eps, **HYPER_BOUNDS["eps"])
    check_state_dtype("dtype", dtype)

    # Validated on the CPU, then placed on ``device`` (by default the default device, which
    # is "meta" while transformers builds a model for ``from_pretrained``).
    device = torch.empty(0, device=device).device

    def vector(name: str, value: TaskVectorLike) -> Tensor:
        try:  # Python numbers straight into ``dtype``: no detour through float32
            tensor = (value if isinstance(value, Tensor)
                      else torch.as_tensor(value, dtype=dtype, device="cpu"))
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be a Tensor or a sequence of {num_tasks} numbers, "
                            f"got {value!r}") from None
        if tensor.dtype == torch.bool or tensor.dtype.is_complex:
            raise TypeError(f"{name} must hold real numbers, got {tensor.dtype}")
        tensor = tensor.detach().to(dtype=dtype, device="cpu")
        if tensor.shape != (num_tasks,):
            raise ValueError(f"{name} must have shape ({num_tasks},), got {tuple(tensor.shape)}")
        check_positive_vector(name, tensor)
        return tensor

    weights = (torch.ones(num_tasks, dtype=dtype, device="cpu") if initial_weights is None
               else vector("initial_weights", initial_weights))
    weight_sum = float(weights.sum())
    weights = weights.to(device, copy=True)
    min_weight = check_real("min_weight", min_weight, low=torch.finfo(dtype).tiny,
                            high=weight_sum / num_tasks, high_inclusive=True)
    initial = (torch.full((num_tasks,), math.nan, dtype=dtype, device=device)
               if initial_losses is None else vector("initial_losses", initial_losses).to(device))

    for name, value in (("alpha", alpha), ("lr", lr), ("betas[0]", beta1), ("betas[1]", beta2),
                        ("eps", eps), ("sum of the initial weights", weight_sum)):
        check_held(name, value, dtype, **HYPER_BOUNDS[name])

    def scalar(value: float | bool) -> Tensor:
        return torch.tensor(value, dtype=torch.bool if isinstance(value, bool) else dtype,
                            device=device)

    zeros = torch.zeros(num_tasks, dtype=dtype, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    return GradNormState(
        weights=weights,
        initial_losses=initial,
        update_count=count,
        skipped_count=count.clone(),
        skipped=scalar(False),
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
            weight_sum=scalar(weight_sum),
        ),
    )


def state_to_dict(state: GradNormState) -> dict[str, Tensor]:
    """Flattens ``state`` into a ``{name: tensor}`` dict for ``torch.save`` or a checkpoint.

    The keys are the field names, with ``hyper.`` before each hyper-parameter; the
    stateful :class:`~gradnorm_func.GradNorm` uses the same keys in its ``state_dict()``.
    """
    flat = {name: value for name, value in state._asdict().items() if name != "hyper"}
    flat.update({f"hyper.{name}": value for name, value in state.hyper._asdict().items()})
    return flat


def state_from_dict(flat: Mapping[str, object], *, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> GradNormState:
    """Inverse of :func:`state_to_dict`: a validated copy of a saved state.

    Applies the rules of :func:`init_state` to every entry, so a corrupted or hand-edited
    checkpoint fails here, naming the key, rather than later or never: weights finite,
    positive and summing to ``hyper.weight_sum``; L_i(0) all unrecorded (NaN) or all finite
    and positive; Adam's moments finite, the second non-negative; counts non-negative; each
    hyper-parameter in its range. Entries are copied, so the caller's tensors never alias
    the state. Keys written before ``skipped_count``, ``skipped`` and ``hyper.weight_sum``
    existed default to 0, False and T. Other keys are ignored.

    Args:
        flat: the mapping :func:`state_to_dict` (or ``GradNorm.state_dict()``) produced.
        dtype: the float dtype of the result (float32 or float64); by default that of
            ``flat["weights"]``.
        device: the device of the result; by default that of ``flat["weights"]``.

    Raises:
        TypeError: an entry is not a tensor, or has the wrong kind of dtype.
        ValueError: an entry is missing, has the wrong shape, or holds a bad value.
    """
    if not isinstance(flat, Mapping):
        raise TypeError(f"a GradNorm state dict must be a mapping of names to tensors, "
                        f"got {type(flat).__name__}")

    def entry(key: str) -> Tensor:
        if key not in flat:
            raise ValueError(f"the GradNorm state dict has no entry {key!r}")
        value = flat[key]
        if not isinstance(value, Tensor):
            raise TypeError(f"state entry {key!r} must be a Tensor, got {type(value).__name__}")
        return value

    stored_weights = entry("weights")
    if stored_weights.dtype not in STATE_DTYPES:
        raise TypeError(f"state entry 'weights' must be float32 or float64, "
                        f"got {stored_weights.dtype}")
    if stored_weights.dim() != 1 or stored_weights.numel() == 0:
        raise ValueError(f"state entry 'weights' must have shape (T,) with T >= 1, "
                         f"got {tuple(stored_weights.shape)}")
    num_tasks = stored_weights.shape[0]
    dtype = check_state_dtype("dtype", stored_weights.dtype if dtype is None else dtype)
    device = stored_weights.device if device is None else device

    def tensor(key: str, shape: tuple[int, ...], kind: str, default: Tensor | None = None
               ) -> Tensor:
        value = default if default is not None and key not in flat else entry(key)
        if tuple(value.shape) != shape:
            raise ValueError(f"state entry {key!r} must have shape {shape}, "
                             f"got {tuple(value.shape)}")
        if kind == "float" and value.dtype not in STATE_DTYPES:
            raise TypeError(f"state entry {key!r} must be float32 or float64, got {value.dtype}")
        if kind == "int" and (value.dtype.is_floating_point or value.dtype == torch.bool
                              or value.dtype.is_complex):
            raise TypeError(f"state entry {key!r} must be an integer tensor, got {value.dtype}")
        if kind == "bool" and value.dtype != torch.bool:
            raise TypeError(f"state entry {key!r} must be a bool tensor, got {value.dtype}")
        target = {"float": dtype, "int": torch.int64, "bool": torch.bool}[kind]
        return value.detach().to(dtype=target, device=device).clone()

    vec = (num_tasks,)
    weights = tensor("weights", vec, "float")
    initial = tensor("initial_losses", vec, "float")
    exp_avg = tensor("exp_avg", vec, "float")
    exp_avg_sq = tensor("exp_avg_sq", vec, "float")
    zero = torch.zeros((), dtype=torch.int64)
    counts = {key: tensor(key, (), "int", default=zero)
              for key in ("update_count", "skipped_count")}
    skipped = tensor("skipped", (), "bool", default=torch.tensor(False))
    default_sum = torch.tensor(float(num_tasks), dtype=dtype)
    hyper = {name: tensor(f"hyper.{name}", (), "bool" if name == "use_adam" else "float",
                          default=default_sum if name == "weight_sum" else None)
             for name in GradNormHyperParams._fields}

    for name, rule in FIELD_BOUNDS.items():
        check_real(f"state entry 'hyper.{name}'", float(hyper[name]), **HYPER_BOUNDS[rule])
    if float(hyper["warmup_steps"]) != int(hyper["warmup_steps"]):
        raise ValueError(f"state entry 'hyper.warmup_steps' must be a whole number, "
                         f"got {float(hyper['warmup_steps'])}")
    total = float(hyper["weight_sum"])
    check_real("state entry 'hyper.min_weight'", float(hyper["min_weight"]),
               low=torch.finfo(dtype).tiny, high=total / num_tasks, high_inclusive=True)
    check_positive_vector("state entry 'weights'", weights)
    if not math.isclose(float(weights.double().sum()), total, rel_tol=1e-4):
        raise ValueError(f"state entry 'weights' must sum to hyper.weight_sum = {total}, "
                         f"got {float(weights.double().sum())} ({weights.tolist()})")
    if not bool(torch.isnan(initial).all()):
        check_positive_vector("state entry 'initial_losses' (or all NaN: not yet recorded)",
                              initial)
    if not bool(torch.isfinite(exp_avg).all()):
        raise ValueError(f"state entry 'exp_avg' must be finite, got {exp_avg.tolist()}")
    if not bool((torch.isfinite(exp_avg_sq) & (exp_avg_sq >= 0)).all()):
        raise ValueError(f"state entry 'exp_avg_sq' must be finite and >= 0, "
                         f"got {exp_avg_sq.tolist()}")
    for key, count in counts.items():
        if int(count) < 0:
            raise ValueError(f"state entry {key!r} must be >= 0, got {int(count)}")
    return GradNormState(weights=weights, initial_losses=initial, exp_avg=exp_avg,
                         exp_avg_sq=exp_avg_sq, skipped=skipped, **counts,
                         hyper=GradNormHyperParams(**hyper))
