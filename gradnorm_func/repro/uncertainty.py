"""Uncertainty weighting of Kendall, Gal and Cipolla, "Multi-Task Learning Using Uncertainty
to Weigh Losses for Scene Geometry and Semantics", CVPR 2018 (arXiv:1705.07115).

Each task has a learned log-variance s_i = log sigma_i^2 (s_i(0) = 0) and the total loss is

    L = sum_i exp(-s_i) L_i + s_i,

for regression and classification tasks alike, the form of common implementations. The s_i
are trained jointly with the network by the same optimiser. The effective task weight is
w_i = exp(-s_i); for fixed L_i the loss is minimised at s_i* = log L_i, i.e. w_i* = 1 / L_i,
so the weights grow as the losses fall.

Kendall et al.'s own terms differ by constants: regression 1/(2 sigma^2) L + log sigma
= (exp(-s) L + s) / 2, and classification (their Eq. 10) 1/sigma^2 L + log sigma
= exp(-s) L + s / 2. Their sum is half of the form above with s_i replaced by s_i - log 2 for
each classification task, plus a constant: the same objective, except that a classification
weight starts at 2 where the form above starts it at 1, and the network's loss is halved.
"""

from __future__ import annotations

from torch import Tensor


def uncertainty_loss(log_vars: Tensor, task_losses: Tensor) -> Tensor:
    """sum_i exp(-s_i) L_i + s_i for log-variances s = ``log_vars`` and losses L = ``task_losses``."""
    return (log_vars.neg().exp() * task_losses + log_vars).sum()


def uncertainty_weights(log_vars: Tensor) -> Tensor:
    """The effective task weights w_i = exp(-s_i)."""
    return log_vars.neg().exp()
