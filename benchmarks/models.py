"""The benchmark's models, their data and losses, and their flop limits.

* ``toy``: the paper's toy model (:class:`~gradnorm_func.repro.toy.ToyMultiTaskNet`), with
  stacked heads (for ``GradNorm.fork``) or separate ``nn.Linear`` heads (for ``heads=``).
* ``conv``: an NYUv2-shaped convolutional model, T=3 (segmentation, depth, surface normals).
* ``transformer``: a token-level multi-task transformer encoder, T=4.

Each model has a ``last_shared_layer`` (GradNorm's W), an elementwise activation after it
(the segment between W and the fork z), and ``heads`` (an ``nn.ModuleList``, each head
called with z) unless the toy's heads are stacked. :class:`Workload` bundles a model
factory with its data and its ``losses(outputs) -> Tensor[T]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from gradnorm_func.repro.toy import ToyMultiTaskNet, per_task_mse


@dataclass
class Workload:
    """One benchmark model: a factory of identical copies, its batch, and its losses."""

    name: str
    num_tasks: int
    make: Callable[[], nn.Module]  # a fresh copy, same initial weights every call
    inputs: Any  # the model's input
    targets: Any  # what ``loss_fn`` compares the outputs with
    loss_fn: Callable[[Any, Any], Tensor]  # (outputs, targets) -> Tensor[T]
    alpha: float  # GradNorm's alpha for this problem
    stacked: bool = False  # heads stacked in one tensor (toy): the model supports ``.fork``

    def losses(self, outputs: Any) -> Tensor:
        """L_i, Tensor[T]."""
        return self.loss_fn(outputs, self.targets)

    def to(self, device: torch.device | str) -> Workload:
        """The same workload on ``device``: data moved, each new copy moved."""
        make = self.make
        return Workload(self.name, self.num_tasks, lambda: make().to(device),
                        _to(self.inputs, device), _to(self.targets, device), self.loss_fn,
                        self.alpha, self.stacked)


def _to(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    return value


def _copies(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """A factory of copies of one model built once under a fixed seed."""
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in build().state_dict().items()}

    def make() -> nn.Module:
        model = build()
        model.load_state_dict(state)
        return model

    return make


# --------------------------------------------------------------------------- toy
def toy(num_tasks: int, batch: int, *, stacked: bool) -> Workload:
    """The paper's toy model (input 250, 4 x 100 ReLU, W = Linear(100, 100), heads 100 -> 100)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 250, generator=gen)
    y = torch.randn(batch, num_tasks, 100, generator=gen)
    make = _copies(lambda: ToyMultiTaskNet(num_tasks, separate_heads=not stacked))
    return Workload(f"toy T={num_tasks} batch={batch}", num_tasks, make, x, y,
                    per_task_mse, alpha=0.12, stacked=stacked)


# --------------------------------------------------------------------------- NYUv2-shaped conv
class NYUv2Net(nn.Module):
    """An NYUv2-shaped encoder with three dense heads (13-class segmentation, depth, normals).

    Encoder: 64x64 -> 32x32 -> 16x16 with 32, 64, 128 channels (five 3x3 convolutions), then
    W = ``last_shared_layer`` (Conv2d 128 -> 128, 3x3) and a ReLU, which is z. Each head:
    Conv2d 128 -> 64 (3x3), ReLU, Conv2d 64 -> C (1x1), bilinear upsampling x4 to 64x64.
    """

    def __init__(self, classes: int = 13) -> None:
        super().__init__()

        def conv(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.ReLU()]

        self.trunk = nn.Sequential(*conv(3, 32), *conv(32, 64, 2), *conv(64, 64),
                                   *conv(64, 128, 2), *conv(128, 128))
        self.last_shared_layer = nn.Conv2d(128, 128, 3, padding=1)

        def head(out: int) -> nn.Module:
            return nn.Sequential(nn.Conv2d(128, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, out, 1),
                                 nn.Upsample(scale_factor=4, mode="bilinear", align_corners=False))

        self.heads = nn.ModuleList([head(classes), head(1), head(3)])

    def forward(self, x: Tensor) -> list[Tensor]:
        z = torch.relu(self.last_shared_layer(self.trunk(x)))
        return [head(z) for head in self.heads]


def nyuv2_losses(outputs: list[Tensor], targets: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """Segmentation cross-entropy, depth L1, and 1 - cosine similarity of the normals."""
    seg, depth, normals = targets
    return torch.stack([
        F.cross_entropy(outputs[0], seg),
        (outputs[1] - depth).abs().mean(),
        (1 - F.cosine_similarity(outputs[2], normals, dim=1)).mean(),
    ])


def conv(batch: int = 8, size: int = 64) -> Workload:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 3, size, size, generator=gen)
    targets = (torch.randint(0, 13, (batch, size, size), generator=gen),
               torch.rand(batch, 1, size, size, generator=gen),
               F.normalize(torch.randn(batch, 3, size, size, generator=gen), dim=1))
    return Workload(f"conv T=3 batch={batch} {size}x{size}", 3, _copies(NYUv2Net), x,
                    targets, nyuv2_losses, alpha=1.5)


# --------------------------------------------------------------------------- transformer
class TokenMultiTaskTransformer(nn.Module):
    """A transformer encoder with token-level heads.

    Token embedding (vocabulary 1000) plus a learned position embedding, ``layers`` x
    ``nn.TransformerEncoderLayer`` (width 256, 8 heads, feed-forward 1024, GELU, no dropout),
    then W = ``last_shared_layer`` (Linear 256 -> 256) and a GELU, which is z. Heads: one
    ``nn.Linear(256, C_i)`` per task on every token.
    """

    def __init__(self, outputs: tuple[int, ...] = (17, 9, 1, 4), *, width: int = 256,
                 layers: int = 4, seq: int = 128, vocab: int = 1000) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(1, seq, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 8, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.last_shared_layer = nn.Linear(width, width)
        self.heads = nn.ModuleList(nn.Linear(width, c) for c in outputs)

    def forward(self, tokens: Tensor) -> list[Tensor]:
        h = self.encoder(self.embed(tokens) + self.position)
        z = F.gelu(self.last_shared_layer(h))
        return [head(z) for head in self.heads]


def token_losses(outputs: list[Tensor], targets: tuple[Tensor, Tensor, Tensor, Tensor]) -> Tensor:
    """Two token classifications (cross-entropy), a token regression and a 4-d regression (MSE)."""
    tags, entities, value, box = targets
    return torch.stack([
        F.cross_entropy(outputs[0].flatten(0, 1), tags.flatten()),
        F.cross_entropy(outputs[1].flatten(0, 1), entities.flatten()),
        F.mse_loss(outputs[2].squeeze(-1), value),
        F.mse_loss(outputs[3], box),
    ])


def transformer(batch: int = 8, seq: int = 128, layers: int = 4) -> Workload:
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 1000, (batch, seq), generator=gen)
    targets = (torch.randint(0, 17, (batch, seq), generator=gen),
               torch.randint(0, 9, (batch, seq), generator=gen),
               torch.randn(batch, seq, generator=gen),
               torch.randn(batch, seq, 4, generator=gen))
    return Workload(f"transformer T=4 batch={batch} seq={seq} layers={layers}", 4,
                    _copies(lambda: TokenMultiTaskTransformer(layers=layers, seq=seq)), tokens,
                    targets, token_losses, alpha=1.5)


# --------------------------------------------------------------------------- flop limits
@dataclass
class FlopLimit:
    """Multiply-adds of a plain step and of the T weight-gradients GradNorm adds."""

    plain_macs: int  # forward + backward of sum_i w_i L_i, counted by FlopCounterMode
    extra_macs: int  # T x (MACs of grad_W for one task)
    weight_grad_macs: int  # MACs of one weight-gradient of W

    @property
    def limit(self) -> float:
        """1 + extra / plain: the ratio to a plain step if time were proportional to MACs."""
        return 1 + self.extra_macs / self.plain_macs


def weight_grad_macs(layer: nn.Module, inputs: Tensor, output: Tensor) -> int:
    """MACs of one weight gradient of a Linear or ConvNd layer: rows x fan_in x fan_out for a
    Linear; output positions x C_out x C_in x prod(kernel) for a convolution."""
    if isinstance(layer, nn.Linear):
        rows = inputs.numel() // inputs.shape[-1]
        return rows * layer.in_features * layer.out_features
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        positions = output.numel() // layer.out_channels  # N x spatial output positions
        per_position = layer.out_channels * layer.in_channels // layer.groups
        return positions * per_position * math.prod(layer.kernel_size)
    raise TypeError(f"no MAC formula for {type(layer).__name__}")


aten = torch.ops.aten
# FlopCounterMode knows the CUDA attention kernels but not the CPU one; same formulas.
_CPU_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *_, out_shape=None, **__: sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *_, out_shape=None, **__: sdpa_backward_flop_count(g, q, k, v),
}


def flop_limit(work: Workload) -> FlopLimit:
    """Counts the plain step's MACs exactly (``FlopCounterMode`` over forward and backward:
    matmuls, convolutions and attention; elementwise ops are not counted) and adds T weight
    gradients of W, from W's shapes."""
    model = work.make()
    seen: dict[str, Tensor] = {}
    handle = model.last_shared_layer.register_forward_hook(
        lambda _m, args, out: seen.update(h=args[0].detach(), y=out.detach()))
    weights = torch.ones(work.num_tasks)
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION)
    with counter:
        (weights * work.losses(model(work.inputs))).sum().backward()
    handle.remove()
    one = weight_grad_macs(model.last_shared_layer, seen["h"], seen["y"])
    plain = counter.get_total_flops() // 2  # FlopCounterMode counts 2 flops per MAC
    return FlopLimit(plain_macs=plain, extra_macs=work.num_tasks * one, weight_grad_macs=one)
