"""A small multi-task network and data with tasks of very different scales, for tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MultiTaskNet(nn.Module):
    """trunk -> shared (last shared layer) -> ReLU -> one Linear head per task."""

    def __init__(self, num_tasks: int, dim: int = 6, hidden: int = 16) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.shared = nn.Linear(hidden, hidden)
        self.heads = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(num_tasks))

    def forward(self, x: Tensor) -> Tensor:
        z = torch.relu(self.shared(self.trunk(x)))
        return torch.cat([head(z) for head in self.heads], dim=1)


def task_data(num_tasks: int, *, batch: int = 32, dim: int = 6, seed: int = 0,
              dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=gen, dtype=dtype)
    scales = torch.logspace(0, 2, num_tasks, dtype=dtype)
    y = torch.tanh(x @ torch.randn(dim, num_tasks, generator=gen, dtype=dtype)) * scales
    return x, y


def task_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return ((model(x) - y) ** 2).mean(0)
