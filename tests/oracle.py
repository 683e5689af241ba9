"""An independent, deliberately naive GradNorm (Chen et al. 2018, Algorithm 1) for tests.

Python floats in double precision and a loop of ``torch.autograd.grad`` over tasks. It shares
no code with the library.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


class NaiveGradNorm:
    def __init__(self, num_tasks: int, *, alpha: float, lr: float, optimizer: str,
                 warmup_steps: int = 0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, min_weight: float = 1e-3,
                 initial_weights: Sequence[float] | None = None,
                 initial_losses: Sequence[float] | None = None) -> None:
        self.T = num_tasks
        self.alpha, self.lr, self.optimizer, self.warmup = alpha, lr, optimizer, warmup_steps
        self.b1, self.b2 = betas
        self.eps, self.floor = eps, min_weight
        self.w = [1.0] * num_tasks if initial_weights is None else [float(w) for w in initial_weights]
        self.total = sum(self.w)
        self.m = [0.0] * num_tasks
        self.v = [0.0] * num_tasks
        self.t = 0
        self.L0: list[float] | None = None if initial_losses is None else [float(l) for l in initial_losses]

    def norms(self, losses: torch.Tensor, shared: Sequence[torch.Tensor]) -> list[float]:
        out = []
        for i in range(self.T):
            grads = torch.autograd.grad(losses[i], list(shared), retain_graph=True)
            out.append(math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads)))
        return out

    def step(self, losses: Sequence[float], norms: Sequence[float]) -> list[float]:
        if self.L0 is None:
            self.L0 = list(losses)
        inv_rate = [l / l0 for l, l0 in zip(losses, self.L0)]
        mean_rate = sum(inv_rate) / self.T
        r = [x / mean_rate for x in inv_rate]
        G = [w * n for w, n in zip(self.w, norms)]
        G_bar = sum(G) / self.T
        target = [G_bar * ri ** self.alpha for ri in r]
        sign = [(g > c) - (g < c) for g, c in zip(G, target)]
        grad = [s * n for s, n in zip(sign, norms)]  # d/dw_i sum_j |w_j n_j - c_j|

        self.t += 1
        lr = self.lr * (min(1.0, self.t / self.warmup) if self.warmup else 1.0)
        new = []
        for i in range(self.T):
            if self.optimizer == "adam":
                self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * grad[i]
                self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * grad[i] ** 2
                m_hat = self.m[i] / (1 - self.b1 ** self.t)
                v_hat = self.v[i] / (1 - self.b2 ** self.t)
                new.append(self.w[i] - lr * m_hat / (math.sqrt(v_hat) + self.eps))
            else:
                new.append(self.w[i] - lr * grad[i])
        new = [max(x, self.floor) for x in new]
        total = sum(new)
        self.w = [x * self.total / total for x in new]
        return self.w
