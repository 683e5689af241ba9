"""The training loop shared by the toy and the digits experiments, for every weighting method.

The network is trained on L = sum_i w_i(t) L_i; only w(t) differs between methods:

- ``equal``: w_i = 1.
- ``gradnorm``: w(t) from ``gradnorm_func.step`` (Chen et al. 2018, Algorithm 1) with W = the
  last shared layer (``last_shared_layer.weight`` and ``.bias``). The network's step uses w(t)
  from *before* ``gf.step``, as Algorithm 1 does.
- ``uncertainty``: L = sum_i exp(-s_i) L_i + s_i (Kendall et al. 2018), the s_i trained by the
  network's optimiser; w_i = exp(-s_i). See :mod:`gradnorm_func.repro.uncertainty`.
- ``dwa``: dynamic weight average (Liu et al. 2019) on epoch-averaged training losses, an epoch
  being ``len(x_train) // batch_size`` steps. See :mod:`gradnorm_func.repro.dwa`.

A run is fixed by the model's initialisation and the minibatch order (:func:`batch_order`),
both of which the caller passes, so that every method sees the same ones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple

import torch
from torch import Tensor
from torch.func import functional_call

import gradnorm_func as gf
from gradnorm_func.repro.dwa import dwa_weights
from gradnorm_func.repro.toy import ToyMultiTaskNet
from gradnorm_func.repro.uncertainty import uncertainty_loss, uncertainty_weights

Kind = Literal["equal", "gradnorm", "uncertainty", "dwa"]
NetOptimizer = Literal["adam", "sgd"]
SHARED = ("last_shared_layer.weight", "last_shared_layer.bias")  # GradNorm's W
LossesFn = Callable[[Tensor, Tensor], Tensor]  # (model output, targets) -> Tensor[T] of L_i
EvaluateFn = Callable[[ToyMultiTaskNet], tuple[Tensor, Tensor]]  # model -> (test L_i, metric_i)


class Weighting(NamedTuple):
    """One task-weighting method."""

    kind: Kind
    alpha: float = 1.5  # GradNorm's exponent (the library's default)
    initial_losses: Tensor | None = None  # GradNorm's L_i(0), Tensor[T]; None: the first step's


@dataclass(frozen=True)
class TrainConfig:
    """Training settings shared by every method."""

    steps: int = 2000
    batch_size: int = 100
    optimizer: NetOptimizer = "adam"
    lr: float = 1e-3  # network (and uncertainty log-variance) learning rate
    weight_lr: float = 0.025  # GradNorm's Adam learning rate on w (the library's default)
    eval_every: int = 50


class RunRecord(NamedTuple):
    """What one training run saw."""

    weights: Tensor  # [steps, T] task weights used at each step (exp(-s) for uncertainty)
    eval_steps: Tensor  # [E] int64: steps at which the test set was evaluated (0 = init)
    test_losses: Tensor  # [E, T] per-task test losses L_i(t)
    test_metrics: Tensor  # [E, T] per-task test metrics (the toy: its losses)
    seconds_per_step: float  # wall time of one training step, evaluations excluded


def batch_order(n: int, *, steps: int, batch_size: int, seed: int) -> Tensor:
    """[steps, batch_size] int64 indices into a training set of n: epochs of n // batch_size
    batches, each epoch a fresh seeded permutation whose last n % batch_size indices are dropped."""
    per_epoch = n // batch_size
    if per_epoch < 1:
        raise ValueError(f"batch_size {batch_size} exceeds the training set size {n}")
    gen = torch.Generator().manual_seed(seed)
    epochs = -(-steps // per_epoch)
    order = torch.cat([torch.randperm(n, generator=gen)[:per_epoch * batch_size]
                       for _ in range(epochs)])
    return order.view(-1, batch_size)[:steps]


def init_model(seed: int, num_tasks: int, *, input_dim: int, hidden: int, depth: int,
               output_dim: int) -> ToyMultiTaskNet:
    """A ``ToyMultiTaskNet`` initialised under ``torch.manual_seed(seed)``; the global
    generator's state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ToyMultiTaskNet(num_tasks, input_dim=input_dim, hidden=hidden, depth=depth,
                               output_dim=output_dim)


def make_optimizer(params: list[Tensor], config: TrainConfig) -> torch.optim.Optimizer:
    """Adam or plain SGD at ``config.lr`` over ``params``."""
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {config.optimizer!r}")


def train(model: ToyMultiTaskNet, weighting: Weighting, x_train: Tensor, y_train: Tensor, *,
          losses_fn: LossesFn, evaluate: EvaluateFn, order: Tensor,
          config: TrainConfig) -> RunRecord:
    """Trains ``model`` in place with one weighting method; records weights and test values.

    Args:
        model: the network, freshly initialised from the run's seed.
        weighting: the method.
        x_train: training inputs, [N, ...].
        y_train: training targets, [N, ...].
        losses_fn: maps (model output, targets) of a batch to the Tensor[T] of losses.
        evaluate: maps the model to its per-task test losses and metrics; called at step 0,
            every ``config.eval_every`` steps and at the end.
        order: [steps, batch] minibatch indices (:func:`batch_order`).
        config: training settings; ``config.steps`` steps are run.
    """
    kind = weighting.kind
    if kind not in ("equal", "gradnorm", "uncertainty", "dwa"):
        raise ValueError(f"unknown weighting {kind!r}")
    num_tasks = model.num_tasks
    log_vars = torch.zeros(num_tasks, requires_grad=True)
    trainable = list(model.parameters()) + ([log_vars] if kind == "uncertainty" else [])
    optimizer = make_optimizer(trainable, config)
    state = gf.init_state(num_tasks, alpha=weighting.alpha, lr=config.weight_lr,
                          initial_losses=weighting.initial_losses)
    per_epoch = len(x_train) // config.batch_size
    epoch_losses: list[Tensor] = []  # DWA's Lbar(e), one Tensor[T] per finished epoch
    epoch_sum = torch.zeros(num_tasks)
    weights = torch.empty(config.steps, num_tasks)
    eval_steps = [s for s in range(config.steps + 1)
                  if s % config.eval_every == 0 or s == config.steps]
    test_losses = torch.empty(len(eval_steps), num_tasks)
    test_metrics = torch.empty(len(eval_steps), num_tasks)
    row_of = {s: row for row, s in enumerate(eval_steps)}

    def record(row: int) -> float:
        """Evaluates into ``row`` and returns the seconds it took."""
        start = time.perf_counter()
        with torch.no_grad():
            test_losses[row], test_metrics[row] = evaluate(model)
        return time.perf_counter() - start

    record(0)
    start, eval_seconds = time.perf_counter(), 0.0
    for t in range(config.steps):
        x, y = x_train[order[t]], y_train[order[t]]
        losses = losses_fn(model(x), y)
        if kind == "gradnorm":
            w = state.weights  # w(t): the network's update uses the weights before the step
            frozen = {k: v.detach() for k, v in model.named_parameters()}
            state, _ = gf.step(state, {k: frozen[k] for k in SHARED},
                               lambda shared: losses_fn(
                                   functional_call(model, {**frozen, **shared}, (x,)), y))
        elif kind == "uncertainty":
            w = uncertainty_weights(log_vars.detach())
        elif kind == "dwa":
            w = dwa_weights(epoch_losses, num_tasks)
            epoch_sum += losses.detach()
            if (t + 1) % per_epoch == 0:
                epoch_losses.append(epoch_sum / per_epoch)
                epoch_sum = torch.zeros(num_tasks)
        else:
            w = torch.ones(num_tasks)
        weights[t] = w
        loss = uncertainty_loss(log_vars, losses) if kind == "uncertainty" else (w * losses).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        if t + 1 in row_of:
            eval_seconds += record(row_of[t + 1])
    seconds_per_step = (time.perf_counter() - start - eval_seconds) / max(1, config.steps)
    return RunRecord(weights, torch.tensor(eval_steps), test_losses, test_metrics,
                     seconds_per_step)


def normalised_test_loss(record: RunRecord) -> Tensor:
    """sum_i L_i(t) / L_i(0) at every evaluation; Tensor[E]. Equals T at initialisation."""
    return (record.test_losses / record.test_losses[0]).sum(1)


def all_losses_rise(runs: dict[str, list[RunRecord]]) -> bool:
    """True when every method's mean over seeds of the final sum_i L_i/L_i(0) exceeds its
    initial value T: no method has lowered the task-normalised test loss."""
    return all(sum(float(normalised_test_loss(r)[-1]) for r in records) / len(records)
               > records[0].test_losses.shape[1] for records in runs.values())
