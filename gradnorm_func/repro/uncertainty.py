"""Uncertainty weighting of Kendall, Gal and Cipolla, "Multi-Task Learning Using Uncertainty
to Weigh Losses for Scene Geometry and Semantics", CVPR 2018 (arXiv:1705.07115).

Each task has a learned log-variance s_i = log sigma_i^2 and the total loss is

    L = sum_i exp(-s_i) L_i + s_i,

the form commonly used for Kendall et al.'s Eq. 7 with s_i = log sigma_i^2 (their regression
form 1/(2 sigma^2) L + log sigma is this one halved, with the same minimiser). The s_i are
trained jointly with the network by the same optimiser. The effective task weight is
w_i = exp(-s_i); for fixed L_i the loss is minimised at s_i* = log L_i, i.e. w_i* = 1 / L_i,
so the weights grow as the losses fall.
"""

from __future__ import annotations

from torch import Tensor


def uncertainty_loss(log_vars: Tensor, task_losses: Tensor) -> Tensor:
    """sum_i exp(-s_i) L_i + s_i for log-variances s = ``log_vars`` and losses L = ``task_losses``."""
    return (log_vars.neg().exp() * task_losses + log_vars).sum()


def uncertainty_weights(log_vars: Tensor) -> Tensor:
    """The effective task weights w_i = exp(-s_i)."""
    return log_vars.neg().exp()
