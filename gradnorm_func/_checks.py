"""The validators of the package, in one place: each raises an error that names the value."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

STATE_DTYPES = (torch.float32, torch.float64)


def check_num_tasks(num_tasks: object) -> int:
    """``num_tasks`` as an int; raises ``ValueError`` unless it is an integer T >= 1."""
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be an integer >= 1, got {num_tasks!r}")
    return num_tasks


def check_count(name: str, value: object, *, low: int) -> int:
    """``value`` as an int; raises ``ValueError`` naming ``name`` unless it is an integer >= low."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def check_real(name: str, value: object, *, low: float, high: float = math.inf,
               low_inclusive: bool = True, high_inclusive: bool = False) -> float:
    """``float(value)``; raises naming ``name`` unless it is a finite real within the bounds.

    Raises:
        TypeError: ``value`` is not a Python real number (a bool, a string, a tensor, ...).
        ValueError: it is not finite or lies outside the bounds.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    above = value >= low if low_inclusive else value > low
    below = value <= high if high_inclusive else value < high
    if not (math.isfinite(value) and above and below):
        lo = "[" if low_inclusive else "("
        hi = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must be finite and in {lo}{low}, {high}{hi}, got {value!r}")
    return float(value)


def check_held(name: str, value: float, dtype: torch.dtype, **bounds: Any) -> None:
    """Raises ``ValueError`` naming ``name`` when ``value``, stored in ``dtype``, leaves the
    bounds of :func:`check_real`: 1e39 becomes inf in float32, 1e-50 becomes 0, 1 - 1e-9
    becomes 1. Reads nothing from a device: call it at construction."""
    stored = float(torch.tensor(value, dtype=dtype, device="cpu"))
    try:
        check_real(name, stored, **bounds)
    except ValueError:
        raise ValueError(f"{name} = {value!r} cannot be held in {dtype}: it becomes {stored}. "
                         "Pass a value within range, or dtype=torch.float64") from None


def check_state_dtype(name: str, dtype: object) -> torch.dtype:
    """Raises unless ``dtype`` is float32 or float64, the dtypes the weight update needs.

    In bfloat16 or float16, 1 - beta2 = 1 - 0.999 rounds to 0 or loses most of its digits
    and the weights lose their sum; the state is T numbers, so it costs nothing to keep it
    in float32 while the model trains in lower precision.
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype, got {dtype!r}")
    if dtype not in STATE_DTYPES:
        raise ValueError(f"{name} must be torch.float32 or torch.float64, got {dtype}: the "
                         "state is T numbers, keep it in float32 even when the model trains in "
                         "bfloat16 or float16 (the losses are cast to the state's dtype)")
    return dtype


def check_task_vector(name: str, value: object, num_tasks: int) -> Tensor:
    """``value`` if it is a floating Tensor of shape [num_tasks]; raises naming ``name``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Tensor of shape ({num_tasks},), one value per task, "
                        f"got {type(value).__name__}")
    if value.shape != (num_tasks,):
        raise ValueError(f"{name} must have shape ({num_tasks},), one value per task, "
                         f"got {tuple(value.shape)}")
    if not value.dtype.is_floating_point:
        raise ValueError(f"{name} must be floating point, got {value.dtype}")
    return value


def check_positive_vector(name: str, value: Tensor) -> None:
    """Raises ``ValueError`` naming ``name`` unless every entry is finite and positive.

    Reads the values: call it at construction or loading, never on the hot path.
    """
    if not bool((torch.isfinite(value) & (value > 0)).all()):
        raise ValueError(f"{name} must be finite and positive, got {value.tolist()}")
