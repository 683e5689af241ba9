"""The fork fast path: every segment type gives the norms of a per-task autograd loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracle import NaiveGradNorm
from torch import Tensor, nn

import gradnorm_func as gf
from gradnorm_func.repro.toy import ToyMultiTaskNet, per_task_mse, toy_regression

T = 3


class ForkNet(nn.Module):
    """trunk -> ``layer`` -> ``between`` (the rest of the shared segment) -> fork -> heads.

    The heads are separate modules (``heads=``) or read ``self.fork(z)`` (stacked fork).
    Every head maps z to a scalar per sample through a flatten and a linear map.
    """

    def __init__(self, layer: nn.Module, between: nn.Module, trunk: nn.Module, z_numel: int,
                 *, sizes: tuple[int, ...] = (1,) * T) -> None:
        super().__init__()
        self.trunk, self.layer, self.between = trunk, layer, between
        self.heads = nn.ModuleList(nn.Sequential(nn.Flatten(), nn.Linear(z_numel, size))
                                   for size in sizes)
        self.fork = None

    def forward(self, x: Tensor) -> list[Tensor]:
        z = self.between(self.layer(self.trunk(x)))
        views = [z] * len(self.heads) if self.fork is None else list(self.fork(z).unbind(0))
        return [head(v) for head, v in zip(self.heads, views)]


def losses_of(outputs: list[Tensor], y: Tensor) -> Tensor:
    """Squared losses of different scales, L_i = 10^i mean (out_i - y_i)^2."""
    return torch.stack([(out - y[:, i:i + out.shape[1]]).square().mean() * 10.0 ** i
                        for i, out in enumerate(outputs)])


def linear(between: nn.Module, *, bias: bool = True, tokens: int = 0) -> tuple[ForkNet, Tensor]:
    trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
    x = torch.randn(12, tokens, 5) if tokens else torch.randn(12, 5)
    return ForkNet(nn.Linear(8, 6, bias=bias), between, trunk, 6 * max(tokens, 1)), x


def conv(kind: str, between: nn.Module) -> tuple[ForkNet, Tensor]:
    if kind == "conv1d":
        trunk, layer = nn.Conv1d(2, 3, 3, padding=1), nn.Conv1d(3, 4, 3, stride=2, padding=2,
                                                                dilation=2)
        x = torch.randn(6, 2, 9)
    else:
        trunk, layer = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 4, (3, 2), stride=(2, 1),
                                                                padding=(1, 0))
        x = torch.randn(6, 2, 7, 5)
    with torch.no_grad():
        z_numel = between(layer(trunk(x)))[0].numel()
    return ForkNet(layer, between, trunk, z_numel), x


SEGMENTS = {  # name -> (model and input, closed form expected)
    "linear": (lambda: linear(nn.Identity()), True),
    "linear, no bias": (lambda: linear(nn.Identity(), bias=False), True),
    "linear + relu": (lambda: linear(nn.ReLU()), True),
    "linear + gelu": (lambda: linear(nn.GELU()), True),
    "linear + tanh": (lambda: linear(nn.Tanh()), True),
    "linear + silu": (lambda: linear(nn.SiLU()), True),
    "linear + leaky relu": (lambda: linear(nn.LeakyReLU(0.1)), True),
    "linear on tokens + gelu": (lambda: linear(nn.GELU(), tokens=4), True),
    "conv1d + relu": (lambda: conv("conv1d", nn.ReLU()), True),
    "conv2d": (lambda: conv("conv2d", nn.Identity()), True),
    "conv2d + sigmoid": (lambda: conv("conv2d", nn.Sigmoid()), True),
    "linear + layernorm (generic vjp)": (lambda: linear(nn.LayerNorm(6)), False),
    "linear + relu + dropout-free scale (generic vjp)": (
        lambda: linear(nn.Sequential(nn.ReLU(), nn.Hardtanh(-0.5, 0.5), nn.Tanh())), False),
}


def run(name: str, fork: str, flow: str, steps: int = 6, scale: float = 1.0):
    """GradNorm on a fixed batch with the model frozen (the norms change only through w and
    the recorded L_i(0)); returns the norms and weights per step, and the oracle's."""
    torch.manual_seed(0)
    make, _ = SEGMENTS[name]
    model, x = make()
    model = model.double()
    x = x.double()
    y = torch.randn(x.shape[0], 3, dtype=torch.float64)
    gn = gf.GradNorm(model.layer, 0.12, T, lr=0.05, dtype=torch.float64,
                     heads=model.heads if fork == "heads" else None)
    if fork == "stacked":
        model.fork = gn.fork
    oracle = NaiveGradNorm(T, alpha=0.12, lr=0.05, optimizer="adam")
    shared = list(model.layer.parameters())
    norms, weights, expected_norms, expected = [], [], [], []
    for _ in range(steps):
        L_ref = losses_of(model(x), y)
        expected_norms.append(oracle.norms(L_ref, shared))
        expected.append(oracle.step(L_ref.tolist(), expected_norms[-1]))
        L_i = losses_of(model(x), y)
        if flow == "forward":
            (gn(L_i) * scale).backward()
        else:
            loss = (gn.w_i * L_i).sum()
            gn.step(L_i)
            loss.backward()
        model.zero_grad()
        norms.append(gn.aux.grad_norms)
        weights.append(gn.w_i)
    return (torch.stack(norms), torch.stack(weights),
            torch.tensor(expected_norms, dtype=torch.float64),
            torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("name", list(SEGMENTS))
@pytest.mark.parametrize("fork,flow", [("heads", "forward"), ("stacked", "forward"),
                                       ("heads", "before"), ("none", "forward")])
def test_every_segment_gives_the_norms_of_a_per_task_loop(name, fork, flow):
    norms, weights, expected_norms, expected = run(name, fork, flow)
    torch.testing.assert_close(norms, expected_norms, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(weights, expected, rtol=1e-9, atol=1e-12)
    assert (weights[-1] - 1).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["linear + relu", "conv2d", "linear + layernorm (generic vjp)"])
def test_closed_form_and_generic_segments_are_chosen_as_documented(name):
    """The closed form applies to a Linear/ConvNd followed by at most one elementwise
    activation; a LayerNorm in between takes the generic vjp (no re-entrant autograd in the
    closed form: torch.autograd.grad is never called during the backward)."""
    make, closed = SEGMENTS[name]
    model, x = make()
    gn = gf.GradNorm(model.layer, 0.12, T, heads=model.heads)
    calls = []
    original = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    torch.autograd.grad = counting_grad
    try:
        gn(losses_of(model(x), torch.randn(x.shape[0], 3))).backward()
    finally:
        torch.autograd.grad = original
    assert (len(calls) == 0) == closed
    assert int(gn.update_count) == 1


def test_scaled_loss_gives_the_weights_of_the_unscaled_one():
    """The coefficient of each L_i is read from the backward: a loss scaled by 1024 or by 1/8
    gives the same norms as the unscaled loss, on the fast path and the general path."""
    reference = run("linear + relu", "heads", "forward")
    for fork in ("heads", "stacked", "none"):
        for scale in (1024.0, 0.125):
            scaled = run("linear + relu", fork, "forward", scale=scale)
            torch.testing.assert_close(scaled[0], reference[0], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(scaled[1], reference[1], rtol=1e-9, atol=1e-12)


def test_extra_loss_terms_through_the_heads_leave_the_norms_exact():
    """loss = gn(L_i) + 5 L_0 + 0.1 ||trunk output||^2: the cotangent of task 0 at the fork
    is (w_0 + 5) dL_0/dz, and GradNorm divides by exactly that coefficient."""
    torch.manual_seed(0)
    model, x = linear(nn.ReLU())
    model = model.double()
    x, y = x.double(), torch.randn(12, 3, dtype=torch.float64)
    gn = gf.GradNorm(model.layer, 0.12, T, dtype=torch.float64, heads=model.heads)
    shared = list(model.layer.parameters())
    for _ in range(4):
        L_ref = losses_of(model(x), y)
        expected = torch.tensor(NaiveGradNorm(T, alpha=0.1, lr=0.1, optimizer="sgd").norms(
            L_ref, shared), dtype=torch.float64)
        L_i = losses_of(model(x), y)
        (gn(L_i) + 5 * L_i[0] + 0.1 * model.trunk(x).square().mean()).backward()
        torch.testing.assert_close(gn.aux.grad_norms, expected, rtol=1e-10, atol=1e-12)


def test_model_gradients_are_those_of_the_weighted_sum_on_every_path():
    """GradNorm never sends gradient into the model: its gradients are those of
    sum_i w_i(t) L_i computed on a copy without GradNorm, bit for bit without a fork (with a
    fork, the T views of z change only the order in which the heads' cotangents are summed)."""
    for fork in ("heads", "stacked", "none"):
        torch.manual_seed(0)
        model, x = linear(nn.GELU())
        reference, _ = linear(nn.GELU())
        reference.load_state_dict(model.state_dict())
        model, reference, x = model.double(), reference.double(), x.double()
        y = torch.randn(12, 3, dtype=torch.float64)
        gn = gf.GradNorm(model.layer, 0.12, T, heads=model.heads if fork == "heads" else None)
        if fork == "stacked":
            model.fork = gn.fork
        for _ in range(3):
            w = gn.w_i.clone()
            gn(losses_of(model(x), y)).backward()
            (w * losses_of(reference(x), y)).sum().backward()
            for p, q in zip(model.parameters(), reference.parameters()):
                if fork == "none":
                    assert torch.equal(p.grad, q.grad)
                else:
                    torch.testing.assert_close(p.grad, q.grad, rtol=1e-13, atol=1e-15)
            model.zero_grad()
            reference.zero_grad()


@pytest.mark.parametrize("name", ["linear + gelu", "linear + relu", "conv2d + sigmoid"])
@pytest.mark.parametrize("flow", ["forward", "before"])
def test_a_head_the_backward_does_not_reach_gets_a_zero_norm(name, flow):
    """With heads=, a task loss cut from the graph leaves its view of z without a cotangent:
    that task's norm is 0 (the update skips, naming it) and the others equal the norms of a
    per-task autograd loop, whether the cotangents are batched (Linear) or not (conv)."""
    torch.manual_seed(0)
    model, x = SEGMENTS[name][0]()
    model, x = model.double(), x.double()
    y = torch.randn(x.shape[0], 3, dtype=torch.float64)
    gn = gf.GradNorm(model.layer, 0.12, T, dtype=torch.float64, heads=model.heads)
    L_ref = losses_of(model(x), y)
    expected = NaiveGradNorm(T, alpha=0.1, lr=0.1, optimizer="sgd").norms(
        L_ref, list(model.layer.parameters()))[:2] + [0.0]
    outputs = model(x)  # L_2 leaves the graph before any op joins it to the other losses
    L_i = torch.cat([losses_of(outputs[:2], y), losses_of(outputs, y)[2:].detach()])
    with pytest.warns(gf.SkippedUpdateWarning, match=r"a zero norm means W is not shared by "
                                                      r"task\(s\) \[2\]"):
        if flow == "forward":
            gn(L_i).backward()
        else:
            loss = (gn.w_i * L_i).sum()
            gn.step(L_i)
            loss.backward()
    torch.testing.assert_close(gn.aux.grad_norms, torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-10, atol=1e-12)
    assert bool(gn.skipped)


@pytest.mark.parametrize("tasks,hidden", [(8, 16), (8, 2048)])
def test_many_tasks_batched_and_chunked_generic_vjp_equals_the_loop(tasks, hidden):
    """Above four tasks the generic segment vjp is batched, in chunks when the cotangents
    are large; the norms equal those of a per-task autograd loop."""
    torch.manual_seed(0)
    model = ToyMultiTaskNet(tasks, input_dim=6, hidden=hidden, depth=2, output_dim=2).double()
    x, y = toy_regression(torch.logspace(0, 2, tasks), 32, input_dim=6, output_dim=2, seed=0)
    x, y = x.double(), y.double()
    # A tensor (not a module) as W forces the generic vjp.
    gn = gf.GradNorm([model.last_shared_layer.weight, model.last_shared_layer.bias], 0.12, tasks,
                     dtype=torch.float64)
    model.fork = gn.fork
    L_ref = per_task_mse(model(x), y)
    expected = NaiveGradNorm(tasks, alpha=0.1, lr=0.1, optimizer="sgd").norms(
        L_ref, list(model.last_shared_layer.parameters()))
    gn(per_task_mse(model(x), y)).backward()
    torch.testing.assert_close(gn.aux.grad_norms, torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-10, atol=1e-12)


def test_functional_fork_gradients_equal_task_gradients():
    """fork_gradients from one training gradient equals task_gradients (vjp + vmap)."""
    torch.manual_seed(0)
    layer, heads = nn.Linear(8, 6), torch.randn(T, 6) * 0.5
    h, y = torch.randn(16, 8), torch.randn(16, T)
    shared = dict(layer.named_parameters())
    weights = torch.tensor([0.5, 1.0, 1.5])

    def segment(p: dict, inputs: Tensor) -> Tensor:
        return F.gelu(torch.func.functional_call(layer, p, (inputs,)))

    def losses(z_t: Tensor) -> Tensor:
        return (torch.einsum("tbh,th->bt", z_t, heads) - y).square().mean(0)

    probe = gf.fork_probe(T, (16, 6))
    cotangents = torch.func.grad(lambda q: (3.0 * weights * losses(gf.fork(segment(shared, h), q)))
                                 .sum())(probe)
    fast = gf.fork_gradients(segment, shared, h, cotangents, 3.0 * weights)
    _, general = gf.task_gradients(shared, lambda p: losses(segment(p, h).expand(T, -1, -1)),
                                   num_tasks=T)
    for key in shared:
        torch.testing.assert_close(fast[key], general[key], rtol=1e-5, atol=1e-6)
