"""The fast paths (fork of the heads) give the weights of the general path and the naive loop."""

from __future__ import annotations

import pytest
import torch
from multitask import MultiTaskNet, task_data, task_losses
from oracle import NaiveGradNorm
from torch import Tensor, nn
from torch.func import functional_call

import gradnorm_func as gf

T = 3


class StackedNet(nn.Module):
    """trunk -> shared Linear -> tanh -> heads stacked as one [T, 1, hidden] weight, via fork."""

    def __init__(self, num_tasks: int = T, dim: int = 6, hidden: int = 16) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.shared = nn.Linear(hidden, hidden)
        self.head_weight = nn.Parameter(torch.randn(num_tasks, 1, hidden) * 0.3)
        self.fork = lambda z: z.expand(num_tasks, *z.shape)  # replaced by gn.fork in tests

    def forward(self, x: Tensor) -> Tensor:
        z_t = self.fork(torch.tanh(self.shared(self.trunk(x))))  # [T, B, hidden]
        return torch.einsum("tbh,toh->bt", z_t, self.head_weight)


class ShapedNet(nn.Module):
    """Separate heads of different output shapes (1, 3 and 2 outputs) after a shared ReLU."""

    def __init__(self, dim: int = 6, hidden: int = 16) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.shared = nn.Linear(hidden, hidden)
        self.heads = nn.ModuleList([nn.Linear(hidden, 1), nn.Sequential(nn.Linear(hidden, 3), nn.Tanh()),
                                    nn.Linear(hidden, 2)])

    def forward(self, x: Tensor) -> list[Tensor]:
        z = torch.relu(self.shared(self.trunk(x)))
        return [head(z) for head in self.heads]


def shaped_losses(outs: list[Tensor], y: Tensor) -> Tensor:
    return torch.stack([((out - y[:, i:i + 1]) ** 2).mean() * (10.0 ** i) for i, out in enumerate(outs)])


def stacked_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return ((model(x) - y) ** 2).mean(0)


MODELS = {
    "separate heads": (lambda: MultiTaskNet(T), task_losses, True),
    "heads of different shapes": (ShapedNet, lambda m, x, y: shaped_losses(m(x), y), True),
    "stacked heads": (StackedNet, stacked_losses, False),
}


def train(name: str, flow: str, steps: int = 12):
    """SGD with GradNorm (Adam on the weights); returns weights, oracle weights, model grads."""
    torch.manual_seed(0)
    make, losses, separate = MODELS[name]
    model = make().double()
    x, y = task_data(T, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    if flow == "general":
        gn = gf.GradNorm(model.shared, 0.12, T, lr=0.05, optimizer="adam", dtype=torch.float64)
    elif separate:
        gn = gf.GradNorm(model.shared, 0.12, T, lr=0.05, optimizer="adam", dtype=torch.float64,
                         heads=model.heads)
    else:
        gn = gf.GradNorm(model.shared, 0.12, T, lr=0.05, optimizer="adam", dtype=torch.float64)
        model.fork = gn.fork
    oracle = NaiveGradNorm(T, alpha=0.12, lr=0.05, optimizer="adam")
    weights, expected, model_grads = [], [], []
    for _ in range(steps):
        opt.zero_grad()
        L_ref = losses(model, x, y)  # the oracle's own forward; the fork is the latest forward's
        expected.append(oracle.step(L_ref.tolist(), oracle.norms(L_ref, list(model.shared.parameters()))))
        L_i = losses(model, x, y)
        loss = (gn.w_i * L_i).sum()
        if flow == "after":
            loss.backward()
            gn.step(L_i)
        elif flow == "seed":
            loss.backward(retain_graph=True)
            gn.apply_grads(gn.gradnorm(L_i))
        else:  # "before" and "general": the recommended flow
            gn.step(L_i)
            loss.backward()
        model_grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
        weights.append(gn.w_i)
    return torch.stack(weights), torch.tensor(expected, dtype=torch.float64), model_grads


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("flow", ["after", "before", "seed"])
def test_fast_path_equals_general_path_and_naive_loop(name, flow):
    fast, expected, fast_grads = train(name, flow)
    general, _, general_grads = train(name, "general")
    torch.testing.assert_close(fast, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fast, general, rtol=1e-9, atol=1e-12)
    for fast_step, general_step in zip(fast_grads, general_grads):
        for a, b in zip(fast_step, general_step):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert (fast[-1] - 1).abs().max() > 1e-2


@pytest.mark.parametrize("flow", ["after", "before"])
def test_fast_path_leaves_model_gradients_bit_identical(flow):
    torch.manual_seed(0)
    model = MultiTaskNet(T).double()
    x, y = task_data(T, dtype=torch.float64)
    gn = gf.GradNorm(model.shared, 1.5, T, lr=0.05, heads=model.heads)
    for _ in range(3):
        model.zero_grad()
        (gn.w_i * task_losses(model, x, y)).sum().backward()  # same graph, no GradNorm call
        reference = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        L_i = task_losses(model, x, y)
        loss = (gn.w_i * L_i).sum()
        if flow == "after":
            loss.backward()
            gn.step(L_i)
        else:
            gn.step(L_i)
            loss.backward()
        for p, g in zip(model.parameters(), reference):
            assert torch.equal(p.grad, g)


def test_fork_norms_equal_task_gradient_norms():
    """Functional path: one grad over (params, probe) gives the model gradient and the norms."""
    torch.manual_seed(0)
    model = ShapedNet().double()
    x, y = task_data(T, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    weights = torch.tensor([0.5, 2.0, 0.5], dtype=torch.float64)
    shared = {k[len("shared."):]: v for k, v in params.items() if k.startswith("shared.")}

    def segment(p: dict, h: Tensor) -> Tensor:
        return torch.relu(functional_call(model.shared, p, (h,)))

    def head_outputs(p: dict, z_t: Tensor) -> list[Tensor]:
        return [functional_call(model.heads[i], {k[len(f"heads.{i}."):]: v for k, v in p.items()
                                                 if k.startswith(f"heads.{i}.")}, (z,))
                for i, z in enumerate(z_t.unbind(0))]

    def weighted_loss(p: dict, probe: Tensor):
        h = functional_call(model.trunk, {k[6:]: v for k, v in p.items() if k.startswith("trunk.")}, (x,))
        shared_p = {k[len("shared."):]: v for k, v in p.items() if k.startswith("shared.")}
        L_i = shaped_losses(head_outputs(p, gf.fork(segment(shared_p, h), probe)), y)
        return (weights * L_i).sum(), (L_i, h)

    probe = gf.fork_probe(T, (x.shape[0], 16), dtype=torch.float64)
    (grads, fork_grads), (L_i, h) = torch.func.grad(weighted_loss, argnums=(0, 1), has_aux=True)(
        params, probe)
    norms = gf.fork_norms(segment, shared, h, fork_grads, weights)

    def losses_of(p: dict) -> Tensor:
        return shaped_losses(functional_call(model, p, (x,)), y)

    expected_losses, expected_norms = gf.task_gradient_norms(
        shared, lambda w: losses_of({**params, **{f"shared.{k}": v for k, v in w.items()}}),
        num_tasks=T)
    expected_grads = torch.func.grad(lambda p: (weights * losses_of(p)).sum())(params)
    torch.testing.assert_close(norms, expected_norms, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(L_i, expected_losses)
    for k in params:
        torch.testing.assert_close(grads[k], expected_grads[k], rtol=1e-12, atol=1e-14)


def test_fork_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"probe must have shape \(T, \*\(4, 2\)\)"):
        gf.fork(torch.zeros(4, 2), torch.zeros(3, 4, 3))
    with pytest.raises(ValueError, match="num_tasks.*0"):
        gf.fork_probe(0, (2,))
    model = MultiTaskNet(3)
    with pytest.raises(ValueError, match=r"one module per task \(2\), got 3"):
        gf.GradNorm(model.shared, 1.5, 2, heads=model.heads)


def test_tasks_in_chunks_give_the_same_weights(monkeypatch):
    """Large activations are processed a few tasks at a time; the result does not change."""
    whole, expected, _ = train("heads of different shapes", "after")
    monkeypatch.setattr("gradnorm_func.capture._CHUNK_ELEMENTS", 1)
    chunked, _, _ = train("heads of different shapes", "after")
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(chunked, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(MODELS))
def test_one_vjp_per_task_and_batched_vjp_agree(name, monkeypatch):
    """The per-task loop (small T) and the batched vjp (larger T) give the same weights."""
    monkeypatch.setattr("gradnorm_func.capture._LOOP_TASKS", 0)
    batched, expected, _ = train(name, "after")
    monkeypatch.setattr("gradnorm_func.capture._LOOP_TASKS", T)
    looped, _, _ = train(name, "after")
    torch.testing.assert_close(looped, batched, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(looped, expected, rtol=1e-9, atol=1e-12)
