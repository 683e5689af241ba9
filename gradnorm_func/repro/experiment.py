"""Training loops of the toy experiment: equal weights, GradNorm and uncertainty weighting.

Every method starts from the same initialisation, sees the same data and the same minibatch
order (all drawn from the run's seed), and trains the network with the same optimiser. Only
the task weighting differs:

- ``equal``: L = sum_i L_i.
- ``gradnorm``: L = sum_i w_i(t) L_i with w(t) from ``gradnorm_func.step`` (Chen et al. 2018,
  Algorithm 1), W = the last shared layer (weight and bias), alpha = 0.12.
- ``uncertainty``: L = sum_i exp(-s_i) L_i + s_i (Kendall et al. 2018), s_i learned with the
  network; see :mod:`gradnorm_func.repro.uncertainty`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple

import torch
from torch import Tensor

import gradnorm_func as gf
from gradnorm_func.repro.toy import (
    SHARED,
    ToyData,
    init_params,
    losses_from_penultimate,
    penultimate,
    task_losses,
)
from gradnorm_func.repro.uncertainty import uncertainty_loss, uncertainty_weights

Method = Literal["equal", "gradnorm", "uncertainty"]
METHODS: tuple[Method, ...] = ("equal", "gradnorm", "uncertainty")
NetOptimizer = Literal["adam", "sgd"]


@dataclass(frozen=True)
class TrainConfig:
    """Training settings shared by every method (the paper states only alpha)."""

    steps: int = 2000
    batch_size: int = 100
    optimizer: NetOptimizer = "adam"
    lr: float = 1e-3  # network (and uncertainty log-variance) learning rate
    alpha: float = 0.12  # GradNorm's restoring-force exponent, Section 4
    weight_lr: float = 0.025  # GradNorm's Adam learning rate on w, as on NYUv2
    eval_every: int = 50


class RunRecord(NamedTuple):
    """What one training run saw."""

    weights: Tensor  # [steps, T] task weights used at each step (exp(-s) for uncertainty)
    eval_steps: Tensor  # [E] int64: steps at which the test loss was measured (0 = init)
    test_losses: Tensor  # [E, T] per-task test losses L_i(t)


def make_optimizer(params: list[Tensor], config: TrainConfig) -> torch.optim.Optimizer:
    """Adam or plain SGD at ``config.lr`` over ``params``."""
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {config.optimizer!r}")


def train(method: Method, data: ToyData, *, init_seed: int, batch_seed: int,
          config: TrainConfig) -> RunRecord:
    """Trains the toy model with one weighting method and records weights and test losses.

    Args:
        method: ``"equal"``, ``"gradnorm"`` or ``"uncertainty"``.
        data: the tasks' train and test sets.
        init_seed: seed of the network initialisation (same for every method).
        batch_seed: seed of the minibatch order (same for every method).
        config: training settings.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    num_tasks = data.y_train.shape[1]
    params = {k: v.requires_grad_() for k, v in init_params(num_tasks, seed=init_seed).items()}
    log_vars = torch.zeros(num_tasks, requires_grad=True)
    trainable = list(params.values()) + ([log_vars] if method == "uncertainty" else [])
    optimizer = make_optimizer(trainable, config)
    state = gf.init_state(num_tasks, alpha=config.alpha, lr=config.weight_lr)
    batches = torch.randint(len(data.x_train), (config.steps, config.batch_size),
                            generator=torch.Generator().manual_seed(batch_seed))
    weights = torch.empty(config.steps, num_tasks)
    eval_steps = [s for s in range(config.steps + 1) if s % config.eval_every == 0 or s == config.steps]
    test_losses = torch.empty(len(eval_steps), num_tasks)

    def evaluate(row: int) -> None:
        with torch.no_grad():
            test_losses[row] = task_losses(params, data.x_test, data.y_test)

    evaluate(0)
    for t in range(config.steps):
        x, y = data.x_train[batches[t]], data.y_train[batches[t]]
        h = penultimate(params, x)
        losses = losses_from_penultimate(params, h, y)
        if method == "equal":
            weights[t] = 1.0
            loss = losses.sum()
        elif method == "gradnorm":
            weights[t] = state.weights  # w(t): the network's update uses the weights before the step
            loss = (state.weights * losses).sum()
            frozen = {k: v.detach() for k, v in params.items()}
            shared = {k: frozen[k] for k in SHARED}
            hidden = h.detach()
            state, _ = gf.step(state, shared,
                               lambda w: losses_from_penultimate({**frozen, **w}, hidden, y))
        else:
            weights[t] = uncertainty_weights(log_vars.detach())
            loss = uncertainty_loss(log_vars, losses)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        if (t + 1) in eval_steps:
            evaluate(eval_steps.index(t + 1))
    return RunRecord(weights, torch.tensor(eval_steps), test_losses)


def run_seeds(data_for_seed: Callable[[int], ToyData], seeds: list[int], *, config: TrainConfig,
              on_run: Callable[[], None] = lambda: None) -> dict[Method, list[RunRecord]]:
    """Every method on every seed; seed s fixes the data, the initialisation and the batches.

    ``on_run`` is called after each run (e.g. to advance a progress bar).
    """
    records: dict[Method, list[RunRecord]] = {m: [] for m in METHODS}
    for seed in seeds:
        data = data_for_seed(seed)
        for method in METHODS:
            records[method].append(train(method, data, init_seed=seed, batch_seed=seed,
                                         config=config))
            on_run()
    return records
