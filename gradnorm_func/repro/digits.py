"""A multi-task problem on real images: two of scikit-learn's bundled 8x8 digits (1,797 images,
no download) overlaid on one 12x12 canvas, in the spirit of MultiMNIST (Sabour et al. 2017).

Canvas n holds source image a at rows and columns 0-7 and source image b at rows and columns
4-11, overlaid by the pixel-wise maximum, pixels scaled to [0, 1]. The source images are split
once per seed into disjoint train and test pools (``test_share`` of them for the test pool), and
the (a, b) pairs of the train and test canvases are drawn from their own pool only. Four tasks,
of different kinds and scales:

- ``digit 1``, ``digit 2``: the labels of a and b, 10-class cross-entropy (L(0) near log 10);
- ``parity``: whether label(a) + label(b) is odd, 2-class cross-entropy (L(0) near log 2);
  it needs both digits;
- ``ink``: the canvas's total ink sum_pixels (in the [0, 1] units of the input, about 38 on
  average), squared loss, whose initial value (about 1.5e3) is over 600x the others'.

Metrics: accuracy for the three classification tasks, R^2 = 1 - SSE / SST (on the test set)
for ink, all higher-is-better.

The network is :class:`~gradnorm_func.repro.toy.ToyMultiTaskNet` (144 inputs, three layers of
128 units, the third being GradNorm's W, and four stacked heads of 10 outputs, of which the
classification heads read the first C and the ink head the first).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from gradnorm_func.repro.toy import ToyMultiTaskNet
from gradnorm_func.repro.training import (RunRecord, TrainConfig, Weighting, batch_order,
                                          init_model, train)

SIDE, CANVAS, OFFSET = 8, 12, 4  # source side, canvas side, offset of the second digit
TASKS = ("digit 1", "digit 2", "parity", "ink")
CLASSES = (10, 10, 2, 0)  # number of classes; 0 marks the regression task
METRIC_NAMES = ("accuracy", "accuracy", "accuracy", "R^2")
HIDDEN, DEPTH = 128, 3
METHODS = ("equal", "gradnorm", "gradnorm_logc", "uncertainty", "dwa", "gradnorm_a0",
           "gradnorm_a0.5")
NAMES = {
    "equal": "equal weights",
    "gradnorm": "GradNorm (defaults)",
    "gradnorm_logc": "GradNorm (L_i(0) = log C)",
    "uncertainty": "uncertainty weighting",
    "dwa": "DWA",
    "gradnorm_a0": "GradNorm (alpha 0)",
    "gradnorm_a0.5": "GradNorm (alpha 0.5)",
}


class DigitsData(NamedTuple):
    """One draw of the train and test canvases."""

    x_train: Tensor  # [N, 144] float32 canvases in [0, 1]
    y_train: Tensor  # [N, 4] float32: label a, label b, parity of a + b, ink
    x_test: Tensor  # [M, 144]
    y_test: Tensor  # [M, 4]
    sources_train: Tensor  # [N, 2] int64: indices of a and b among scikit-learn's digits
    sources_test: Tensor  # [M, 2] int64


def load_sources() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled digits: images [1797, 8, 8] float32 in [0, 1] and labels [1797]."""
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]

    digits = load_digits()
    return (torch.tensor(digits.images, dtype=torch.float32) / 16,
            torch.tensor(digits.target, dtype=torch.int64))


def overlay(first: Tensor, second: Tensor) -> Tensor:
    """[n, 12, 12] canvases: ``first`` [n, 8, 8] at the top left, ``second`` at the bottom right
    (offset 4), the pixel-wise maximum where they overlap."""
    canvas = first.new_zeros(len(first), CANVAS, CANVAS)
    canvas[:, :SIDE, :SIDE] = first
    lower = canvas[:, OFFSET:, OFFSET:]
    canvas[:, OFFSET:, OFFSET:] = torch.maximum(lower, second)
    return canvas


def targets(labels: Tensor, canvases: Tensor) -> Tensor:
    """[n, 4] targets of canvases [n, 12, 12] whose digits have ``labels`` [n, 2]."""
    parity = (labels[:, 0] + labels[:, 1]) % 2
    return torch.stack([labels[:, 0].float(), labels[:, 1].float(), parity.float(),
                        canvases.sum((1, 2))], dim=1)


def make_digits_data(*, seed: int, n_train: int, n_test: int, test_share: float = 0.3
                     ) -> DigitsData:
    """Splits the source images into disjoint pools and draws canvases from each, seeded.

    Args:
        seed: fixes the split and the pairs; the same for every method compared.
        n_train: number of training canvases (pairs drawn with replacement from the train pool).
        n_test: number of test canvases, from the test pool.
        test_share: share of the 1,797 source images in the test pool.
    """
    images, labels = load_sources()
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(images), generator=gen)
    n_pool = round(test_share * len(images))
    pools = {"test": perm[:n_pool], "train": perm[n_pool:]}

    def canvases(pool: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
        sources = pool[torch.randint(len(pool), (n, 2), generator=gen)]
        canvas = overlay(images[sources[:, 0]], images[sources[:, 1]])
        return canvas.reshape(n, -1), targets(labels[sources], canvas), sources

    x_train, y_train, s_train = canvases(pools["train"], n_train)
    x_test, y_test, s_test = canvases(pools["test"], n_test)
    return DigitsData(x_train, y_train, x_test, y_test, s_train, s_test)


def digits_losses(output: Tensor, y: Tensor) -> Tensor:
    """Tensor[4]: cross-entropy of each classification head (its first C outputs) and the
    squared loss of the ink head (its first output), batch means."""
    losses = [F.cross_entropy(output[:, i, :c], y[:, i].long()) if c
              else (output[:, i, 0] - y[:, i]).square().mean()
              for i, c in enumerate(CLASSES)]
    return torch.stack(losses)


def digits_metrics(output: Tensor, y: Tensor) -> Tensor:
    """Tensor[4]: accuracy of each classification head, R^2 = 1 - SSE/SST of the ink head."""
    metrics = []
    for i, c in enumerate(CLASSES):
        if c:
            metrics.append((output[:, i, :c].argmax(1) == y[:, i].long()).float().mean())
        else:
            sse = (output[:, i, 0] - y[:, i]).square().sum()
            metrics.append(1 - sse / (y[:, i] - y[:, i].mean()).square().sum())
    return torch.stack(metrics)


def log_c_initial_losses(y_train: Tensor) -> Tensor:
    """L_i(0) = log C_i for the classification tasks (the theoretical initial loss Chen et al.
    2018 suggest in Section 3 when the first loss depends heavily on initialisation), and for
    ink the loss of a zero prediction, mean(y^2) over the training set, which the near-zero
    initial outputs approach."""
    return torch.tensor([math.log(c) if c else float(y_train[:, i].square().mean())
                         for i, c in enumerate(CLASSES)])


def weighting(method: str, y_train: Tensor) -> Weighting:
    """The :class:`Weighting` of a method in :data:`METHODS`: GradNorm at the library's defaults
    (alpha 1.5, Adam at 0.025, L_i(0) = the first step's losses), with L_i(0) from
    :func:`log_c_initial_losses`, or at alpha 0 and 0.5 (the paper's sensitivity check)."""
    methods = {"equal": Weighting("equal"), "uncertainty": Weighting("uncertainty"),
               "dwa": Weighting("dwa"), "gradnorm": Weighting("gradnorm"),
               "gradnorm_a0": Weighting("gradnorm", alpha=0.0),
               "gradnorm_a0.5": Weighting("gradnorm", alpha=0.5)}
    if method == "gradnorm_logc":
        return Weighting("gradnorm", initial_losses=log_c_initial_losses(y_train))
    if method not in methods:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return methods[method]


def train_digits(method: str, data: DigitsData, *, seed: int, config: TrainConfig) -> RunRecord:
    """Trains the digits network with one method; ``seed`` fixes its initialisation and the
    minibatch order."""
    model = init_model(seed, len(TASKS), input_dim=CANVAS * CANVAS, hidden=HIDDEN, depth=DEPTH,
                       output_dim=max(CLASSES))

    def evaluate(net: ToyMultiTaskNet) -> tuple[Tensor, Tensor]:
        output = net(data.x_test)
        return digits_losses(output, data.y_test), digits_metrics(output, data.y_test)

    order = batch_order(len(data.x_train), steps=config.steps, batch_size=config.batch_size,
                        seed=seed)
    return train(model, weighting(method, data.y_train), data.x_train, data.y_train,
                 losses_fn=digits_losses, evaluate=evaluate, order=order, config=config)


def run_digits(seeds: list[int], *, config: TrainConfig, n_train: int, n_test: int,
               on_run: Callable[[str, int], None] = lambda method, seed: None
               ) -> dict[str, list[RunRecord]]:
    """Every method on every seed; seed s fixes the data, the initialisation and the batches.
    ``on_run(method, seed)`` is called after each run."""
    records: dict[str, list[RunRecord]] = {m: [] for m in METHODS}
    for seed in seeds:
        data = make_digits_data(seed=seed, n_train=n_train, n_test=n_test)
        for method in METHODS:
            records[method].append(train_digits(method, data, seed=seed, config=config))
            on_run(method, seed)
    return records
