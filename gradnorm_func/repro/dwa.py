"""Dynamic weight average (DWA) of Liu, Johns and Davison, "End-to-End Multi-Task Learning with
Attention", CVPR 2019 (arXiv:1803.10704), Eq. 7: a loss-only baseline, no gradients needed.

With Lbar_i(e) the training loss of task i averaged over epoch e (as Liu et al. do),

    r_i(e - 1) = Lbar_i(e - 1) / Lbar_i(e - 2),
    w_i(e) = T exp(r_i(e - 1) / Temp) / sum_j exp(r_j(e - 1) / Temp),    Temp = 2,

and w_i = 1 during the first two epochs. The weights are constant within an epoch and sum to
T; a task whose loss fell least over the last epoch gets the largest weight.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

TEMPERATURE = 2.0  # Liu et al.'s Temp


def dwa_weights(epoch_losses: Sequence[Tensor], num_tasks: int, *,
                temperature: float = TEMPERATURE) -> Tensor:
    """The DWA weights of the next epoch, given the epoch-averaged losses of the epochs so far.

    Args:
        epoch_losses: Lbar(0), ..., Lbar(e - 1), each Tensor[T]; fewer than two gives w = 1.
        num_tasks: T.
        temperature: Temp, 2 in Liu et al.

    Returns:
        Tensor[T] w(e) = T softmax(r(e - 1) / Temp), with r(e - 1) = Lbar(e - 1) / Lbar(e - 2).
    """
    if len(epoch_losses) < 2:
        return torch.ones(num_tasks)
    ratios = epoch_losses[-1] / epoch_losses[-2]
    return num_tasks * torch.softmax(ratios / temperature, dim=0)
