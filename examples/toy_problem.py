"""A small multi-task regression shared by the examples: tasks of very different scales.

Task i regresses sigma_i * tanh(x A_i) from x, in the spirit of the paper's toy problem
(Chen et al. 2018, Sec. 4), scaled down so that the examples run in seconds.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ToyMultiTask(nn.Module):
    """A ReLU trunk, a last shared layer, then one linear head per task, outputs [B, T, out]."""

    def __init__(self, num_tasks: int, *, dim: int = 32, hidden: int = 64, out: int = 8) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.last_shared_layer = nn.Linear(hidden, hidden)
        self.heads = nn.ModuleList(nn.Linear(hidden, out) for _ in range(num_tasks))

    def forward(self, x: Tensor) -> Tensor:
        z = torch.relu(self.last_shared_layer(self.trunk(x)))
        return torch.stack([head(z) for head in self.heads], dim=1)


def toy_dataset(num_tasks: int, *, samples: int = 512, dim: int = 32, out: int = 8,
                seed: int = 0) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    sigmas = torch.logspace(0, 2, num_tasks)  # 1 ... 100
    x = torch.randn(samples, dim, generator=gen)
    maps = torch.randn(num_tasks, dim, out, generator=gen) / dim**0.5
    y = sigmas[:, None] * torch.tanh(torch.einsum("bd,tdo->bto", x, maps))
    return torch.utils.data.TensorDataset(x, y)
