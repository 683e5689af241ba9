"""The toy regression tasks and model of Chen et al. (2018), Section 4 (arXiv:1711.02257).

Task i maps x in R^250 to R^100 as

    f_i(x) = sigma_i * tanh((B + eps_i) x),

with B and eps_i matrices of i.i.d. N(0, 10) and N(0, 3.5) entries, drawn once and kept
constant. The model (:class:`ToyMultiTaskNet`) is a trunk of four fully connected ReLU layers
of 100 units followed by one affine head per task, trained with the squared loss. The fourth
layer, ``last_shared_layer``, is GradNorm's W.

The paper leaves the law of x and the meaning of the second argument of N(., .) unstated;
both are options here (``input_law``, ``scale_reading``).
"""

from __future__ import annotations

import math
from typing import Callable, Literal, NamedTuple

import torch
from torch import Tensor, nn

INPUT_DIM = 250
OUTPUT_DIM = 100
HIDDEN = 100
TRUNK_DEPTH = 4
B_SCALE = 10.0  # B ~ N(0, 10)
EPS_SCALE = 3.5  # eps_i ~ N(0, 3.5)
SATURATION_THRESHOLD = 2.0  # |z| > 2 means tanh'(z) < 0.071

InputLaw = Literal["normal", "uniform", "scaled-normal"]
ScaleReading = Literal["variance", "std"]
INPUT_LAWS: tuple[InputLaw, ...] = ("normal", "uniform", "scaled-normal")
SCALE_READINGS: tuple[ScaleReading, ...] = ("variance", "std")


class ToyData(NamedTuple):
    """One draw of the tasks and of the train and test sets."""

    x_train: Tensor  # [N, 250] float32
    y_train: Tensor  # [N, T, 100] float32: y[n, i] = f_i(x[n])
    x_test: Tensor  # [M, 250] float32
    y_test: Tensor  # [M, T, 100] float32
    saturation: Tensor  # [] float: share of test pre-activations with |(B + eps_i) x| > 2


def draw_sigmas(num_tasks: int, *, scale: float, seed: int) -> Tensor:
    """Task scales sigma_i = |z_i| with z_i ~ N(0, scale^2), the "wide normal" of Section 4."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_tasks, generator=gen).abs() * scale


def sample_inputs(n: int, *, law: InputLaw, generator: torch.Generator) -> Tensor:
    """n inputs x in R^250: ``normal`` N(0, I), ``uniform`` U(-1, 1)^250 or
    ``scaled-normal`` N(0, I / 250) (so that ||x|| is about 1)."""
    if law == "uniform":
        return torch.rand(n, INPUT_DIM, generator=generator) * 2 - 1
    x = torch.randn(n, INPUT_DIM, generator=generator)
    if law == "scaled-normal":
        return x / math.sqrt(INPUT_DIM)
    if law == "normal":
        return x
    raise ValueError(f"input_law must be one of {INPUT_LAWS}, got {law!r}")


def make_data(sigmas: Tensor, *, seed: int, n_train: int, n_test: int,
              input_law: InputLaw = "normal", scale_reading: ScaleReading = "variance") -> ToyData:
    """Draws B, eps_i, the inputs and the targets f_i(x) from one seeded generator.

    Args:
        sigmas: Tensor[T] of task scales sigma_i.
        seed: the data seed; the same for every method compared.
        n_train: training set size.
        n_test: test set size.
        input_law: law of x (unstated in the paper); see :func:`sample_inputs`.
        scale_reading: whether N(0, 10) has variance 10 (``"variance"``, the usual
            N(mu, sigma^2) notation) or standard deviation 10 (``"std"``).
    """
    if scale_reading not in SCALE_READINGS:
        raise ValueError(f"scale_reading must be one of {SCALE_READINGS}, got {scale_reading!r}")
    gen = torch.Generator().manual_seed(seed)

    def std(scale: float) -> float:
        return math.sqrt(scale) if scale_reading == "variance" else scale

    base = torch.randn(OUTPUT_DIM, INPUT_DIM, generator=gen) * std(B_SCALE)
    maps = base + torch.randn(len(sigmas), OUTPUT_DIM, INPUT_DIM, generator=gen) * std(EPS_SCALE)

    def targets(x: Tensor) -> tuple[Tensor, Tensor]:
        pre = torch.einsum("tok,nk->nto", maps, x)
        return sigmas.view(1, -1, 1) * torch.tanh(pre), pre

    x_train = sample_inputs(n_train, law=input_law, generator=gen)
    x_test = sample_inputs(n_test, law=input_law, generator=gen)
    y_train, _ = targets(x_train)
    y_test, pre_test = targets(x_test)
    saturation = (pre_test.abs() > SATURATION_THRESHOLD).float().mean()
    return ToyData(x_train, y_train, x_test, y_test, saturation)


class ToyMultiTaskNet(nn.Module):
    """The toy model of Chen et al. (2018), Section 4, as a module, at any size.

    ``depth`` fully connected ReLU layers of ``hidden`` units (the last one,
    ``last_shared_layer``, is GradNorm's W), then one affine head per task. The heads are
    stacked (``heads_weight`` [T, out, hidden], ``heads_bias`` [T, out], applied as one
    einsum) unless ``separate_heads``, which makes ``heads`` an ``nn.ModuleList`` of
    ``nn.Linear`` (for ``GradNorm(..., heads=model.heads)``). The paper's sizes are the
    defaults; the examples and tests use smaller ones.

    ``forward(x)`` returns [B, T, output_dim]. Set ``fork`` to a function mapping the shared
    representation z [B, hidden] to per-task copies [T, B, hidden] (``GradNorm.fork``) and
    head i reads copy i only.

    Initialisation is PyTorch's default for ``nn.Linear``, U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for weights and biases alike, drawn from the global generator.
    """

    def __init__(self, num_tasks: int, *, input_dim: int = INPUT_DIM, hidden: int = HIDDEN,
                 depth: int = TRUNK_DEPTH, output_dim: int = OUTPUT_DIM,
                 separate_heads: bool = False) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        layers: list[nn.Module] = []
        fan_in = input_dim
        for _ in range(depth - 1):
            layers += [nn.Linear(fan_in, hidden), nn.ReLU()]
            fan_in = hidden
        self.num_tasks = num_tasks
        self.trunk = nn.Sequential(*layers)
        self.last_shared_layer = nn.Linear(fan_in, hidden)
        self.fork: Callable[[Tensor], Tensor] | None = None
        if separate_heads:
            self.heads = nn.ModuleList(nn.Linear(hidden, output_dim) for _ in range(num_tasks))
        else:
            bound = 1 / math.sqrt(hidden)
            self.heads_weight = nn.Parameter(
                torch.empty(num_tasks, output_dim, hidden).uniform_(-bound, bound))
            self.heads_bias = nn.Parameter(torch.empty(num_tasks, output_dim).uniform_(-bound, bound))

    def shared(self, x: Tensor) -> Tensor:
        """z = relu(W h + b), the representation where the heads fork; [B, hidden]."""
        return torch.relu(self.last_shared_layer(self.trunk(x)))

    def forward(self, x: Tensor) -> Tensor:
        z = self.shared(x)
        z_t = None if self.fork is None else self.fork(z)
        if hasattr(self, "heads"):
            views = [z] * self.num_tasks if z_t is None else list(z_t.unbind(0))
            return torch.stack([head(v) for head, v in zip(self.heads, views)], dim=1)
        if z_t is None:
            return torch.einsum("bk,tok->bto", z, self.heads_weight) + self.heads_bias
        return torch.einsum("tbk,tok->bto", z_t, self.heads_weight) + self.heads_bias


def toy_regression(sigmas: Tensor, n: int, *, input_dim: int, output_dim: int, seed: int
                   ) -> tuple[Tensor, Tensor]:
    """n samples of f_i(x) = sigma_i tanh(x A_i) with A_i ~ N(0, 1/input_dim), x ~ N(0, I).

    The paper's task family at a small size, with inputs scaled so that tanh is not
    saturated; returns x [n, input_dim] and y [n, T, output_dim].
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, input_dim, generator=gen)
    maps = torch.randn(len(sigmas), input_dim, output_dim, generator=gen) / math.sqrt(input_dim)
    y = sigmas.view(1, -1, 1) * torch.tanh(torch.einsum("nd,tdo->nto", x, maps))
    return x, y


def per_task_mse(prediction: Tensor, target: Tensor) -> Tensor:
    """L_i = mean over samples and outputs of (prediction - target)^2 for [B, T, out]; Tensor[T]."""
    return (prediction - target).square().mean((0, 2))
