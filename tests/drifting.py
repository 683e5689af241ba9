"""A multi-task regression on the shared toy model whose loss ratios drift apart, for tests."""

from __future__ import annotations

import torch
from torch import Tensor

from gradnorm_func.repro.toy import ToyMultiTaskNet, per_task_mse

SHARED = ("last_shared_layer.weight", "last_shared_layer.bias")


class DriftingTasks:
    """The toy model at a small size; L_i(t) = exp(drift_i t) MSE_i, so r_i(t) moves away from 1."""

    def __init__(self, num_tasks: int, *, seed: int, dtype: torch.dtype = torch.float64,
                 batch: int = 16, dim: int = 6, hidden: int = 16) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.T = num_tasks
        self.model = ToyMultiTaskNet(num_tasks, input_dim=dim, hidden=hidden, depth=2,
                                     output_dim=1).to(dtype)
        with torch.no_grad():
            for p in self.model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.5)
        self.x = torch.randn(batch, dim, generator=gen, dtype=dtype)
        scales = torch.logspace(0, 1.5, num_tasks, dtype=dtype)
        self.y = torch.randn(batch, num_tasks, 1, generator=gen, dtype=dtype) * scales.view(1, -1, 1)
        self.drift = (torch.rand(num_tasks, generator=gen, dtype=dtype) - 0.5) * 0.3
        self.t = 0

    def losses_with(self, params: dict[str, Tensor]) -> Tensor:
        out = torch.func.functional_call(self.model, params, (self.x,))
        return per_task_mse(out, self.y) * torch.exp(self.drift * self.t)

    def params(self) -> dict[str, Tensor]:
        return {k: v.detach() for k, v in self.model.named_parameters()}

    def advance(self, weights: Tensor, lr: float = 1e-4) -> None:
        """One SGD step of the model on sum_i w_i L_i, then the clock ticks."""
        params = {k: v.requires_grad_(True) for k, v in self.params().items()}
        loss = (weights.detach() * self.losses_with(params)).sum()
        grads = torch.autograd.grad(loss, list(params.values()))
        with torch.no_grad():
            for p, g in zip(self.model.parameters(), grads):
                p -= lr * g
        self.t += 1
