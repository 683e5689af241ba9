"""Whether a tensor's value can be read on the host without a device sync or a graph break."""

from __future__ import annotations

import torch
from torch import Tensor


def tracing() -> bool:
    """Whether the code is being traced by ``torch.compile``, where no value can be read."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling is not None and is_compiling())


def readable(*tensors: Tensor) -> bool:
    """Whether reading ``tensors`` costs no device sync and no graph break: eager, on the CPU."""
    return not tracing() and all(
        tensor.device.type == "cpu" and not torch._C._functorch.is_functorch_wrapped_tensor(tensor)
        for tensor in tensors)
