"""The toy experiment of Chen et al. (2018), Section 4: equal weights, GradNorm and uncertainty
weighting on :class:`~gradnorm_func.repro.toy.ToyMultiTaskNet` at the paper's sizes.

Every method starts from the same initialisation (``torch.manual_seed(seed)`` before the model
is built), sees the same data and the same minibatch order (all fixed by the run's seed), and
trains the network with the same optimiser; the loop is :func:`~gradnorm_func.repro.training.train`.
GradNorm runs at the paper's toy alpha = 0.12, with the library's Adam at 0.025 on the weights
and L_i(0) the first step's losses.
"""

from __future__ import annotations

from typing import Callable, Literal

from torch import Tensor

from gradnorm_func.repro.toy import (
    HIDDEN,
    INPUT_DIM,
    OUTPUT_DIM,
    TRUNK_DEPTH,
    ToyData,
    ToyMultiTaskNet,
    per_task_mse,
)
from gradnorm_func.repro.training import (
    RunRecord,
    TrainConfig,
    Weighting,
    batch_order,
    init_model,
    train,
)

Method = Literal["equal", "gradnorm", "uncertainty"]
METHODS: tuple[Method, ...] = ("equal", "gradnorm", "uncertainty")
PAPER_ALPHA = 0.12  # Section 4


def train_toy(method: Method, data: ToyData, *, seed: int, config: TrainConfig,
              alpha: float = PAPER_ALPHA) -> RunRecord:
    """Trains the paper's toy model with one method; ``seed`` fixes its initialisation and
    minibatch order. The per-task test metric recorded is the test loss itself."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    num_tasks = data.y_train.shape[1]
    model = init_model(seed, num_tasks, input_dim=INPUT_DIM, hidden=HIDDEN, depth=TRUNK_DEPTH,
                       output_dim=OUTPUT_DIM)

    def evaluate(net: ToyMultiTaskNet) -> tuple[Tensor, Tensor]:
        losses = per_task_mse(net(data.x_test), data.y_test)
        return losses, losses

    order = batch_order(len(data.x_train), steps=config.steps, batch_size=config.batch_size,
                        seed=seed)
    return train(model, Weighting(method, alpha=alpha), data.x_train, data.y_train,
                 losses_fn=per_task_mse, evaluate=evaluate, order=order, config=config)


def run_seeds(data_for_seed: Callable[[int], ToyData], seeds: list[int], *, config: TrainConfig,
              alpha: float = PAPER_ALPHA, on_run: Callable[[], None] = lambda: None
              ) -> dict[Method, list[RunRecord]]:
    """Every method on every seed; seed s fixes the data, the initialisation and the batches.

    ``on_run`` is called after each run (e.g. to advance a progress bar).
    """
    records: dict[Method, list[RunRecord]] = {m: [] for m in METHODS}
    for seed in seeds:
        data = data_for_seed(seed)
        for method in METHODS:
            records[method].append(train_toy(method, data, seed=seed, config=config, alpha=alpha))
            on_run()
    return records
