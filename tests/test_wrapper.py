"""The GradNorm module: its flows, accumulation, update_every, prior weights, module behaviour."""

from __future__ import annotations

import copy

import pytest
import torch
from oracle import NaiveGradNorm
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradnorm_func as gf
from gradnorm_func.repro.toy import ToyMultiTaskNet, per_task_mse, toy_regression

SIGMAS = torch.tensor([1.0, 10.0, 100.0])


def problem(batch: int = 32, *, separate_heads: bool = False, seed: int = 0,
            dtype: torch.dtype = torch.float64) -> tuple[ToyMultiTaskNet, Tensor, Tensor]:
    torch.manual_seed(seed)
    model = ToyMultiTaskNet(3, input_dim=6, hidden=16, depth=2, output_dim=2,
                            separate_heads=separate_heads).to(dtype)
    x, y = toy_regression(SIGMAS, batch, input_dim=6, output_dim=2, seed=seed)
    return model, x.to(dtype), y.to(dtype)


def train(flow: str, steps: int = 12, fork: str = "none", **options):
    """SGD on the model with GradNorm; checks the model's gradients against an independent
    computation of sum_i w_i(t) L_i at every step. Returns the weights per step."""
    model, x, y = problem(separate_heads=fork == "heads")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    gn = gf.GradNorm(model.last_shared_layer, 1.5, 3, lr=0.05, dtype=torch.float64,
                     heads=model.heads if fork == "heads" else None, **options)
    if fork == "stacked":
        model.fork = gn.fork
    history = []
    for _ in range(steps):
        opt.zero_grad()
        w_old = gn.w_i.clone()
        reference = copy.deepcopy(model)
        reference.fork = None
        ref_grads = torch.autograd.grad((w_old * per_task_mse(reference(x), y)).sum(),
                                        list(reference.parameters()))
        L_i = per_task_mse(model(x), y)
        if flow == "forward":
            loss = gn(L_i)
            torch.testing.assert_close(gn.w_i, w_old, rtol=0, atol=0)  # not before the backward
            loss.backward()
        elif flow == "step":
            loss = (gn.w_i * L_i).sum()
            gn.step(L_i)
            loss.backward()
        else:  # the seed library's flow
            loss = (gn.w_i * L_i).sum()
            loss.backward(retain_graph=True)
            gn.apply_grads(gn.gradnorm(L_i))
        for p, g in zip(model.parameters(), ref_grads):
            torch.testing.assert_close(p.grad, g, rtol=1e-13, atol=1e-15)
        opt.step()
        history.append(gn.w_i)
    return torch.stack(history)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_every_flow_gives_the_weights_of_naive_algorithm_1(optimizer):
    """gradnorm(L_i), step(L_i) before backward and the seed flow, without a fork and with
    either fork, all give the weights of the float64 per-task loop."""
    model, x, y = problem()
    oracle = NaiveGradNorm(3, alpha=1.5, lr=0.05, optimizer=optimizer)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    expected = []
    for _ in range(12):
        opt.zero_grad()
        L_i = per_task_mse(model(x), y)
        w = torch.tensor(oracle.w, dtype=torch.float64)
        expected.append(oracle.step(L_i.tolist(), oracle.norms(L_i, list(
            model.last_shared_layer.parameters()))))
        (w * L_i).sum().backward()
        opt.step()
    expected = torch.tensor(expected, dtype=torch.float64)
    assert (expected[-1] - 1).abs().max() > 1e-2
    for flow, fork in [("forward", "none"), ("forward", "stacked"), ("step", "none"),
                       ("step", "stacked"), ("seed", "none"), ("seed", "stacked")]:
        torch.testing.assert_close(train(flow, fork=fork, optimizer=optimizer), expected,
                                   rtol=1e-9, atol=1e-12, msg=f"{flow}, fork {fork}")


def test_separate_heads_give_the_same_weights_in_every_flow():
    reference = train("step")
    for flow in ("forward", "step", "seed"):
        torch.testing.assert_close(train(flow, fork="heads"), train("step", fork="heads"),
                                   rtol=1e-9, atol=1e-12)
    assert reference.shape == (12, 3)


def grad_accumulation(micro_batches: int, fork: str, flow: str, steps: int = 3):
    """``steps`` optimizer steps over batches of 100, each as ``micro_batches`` micro-batches."""
    model, x, y = problem(batch=100 * steps, separate_heads=fork == "heads")
    gn = gf.GradNorm(model.last_shared_layer, 1.5, 3, lr=0.05, dtype=torch.float64,
                     accumulation_steps=micro_batches,
                     heads=model.heads if fork == "heads" else None)
    if fork == "stacked":
        model.fork = gn.fork
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    size = 100 // micro_batches
    history = []
    for s in range(steps):
        opt.zero_grad()
        for m in range(micro_batches):
            rows = slice(100 * s + m * size, 100 * s + (m + 1) * size)
            L_i = per_task_mse(model(x[rows]), y[rows])
            weights = gn.w_i
            if flow == "forward":
                (gn(L_i) / micro_batches).backward()
            else:
                loss = (gn.w_i * L_i).sum() / micro_batches
                gn.step(L_i)
                loss.backward()
            if m < micro_batches - 1:
                torch.testing.assert_close(gn.w_i, weights, rtol=0, atol=0)
        opt.step()
        history.append(gn.w_i)
    return torch.stack(history)


@pytest.mark.parametrize("fork", ["none", "heads", "stacked"])
@pytest.mark.parametrize("flow", ["forward", "step"])
def test_accumulating_4_micro_batches_of_25_equals_one_batch_of_100(fork, flow):
    """accumulation_steps=4: fixed weights over the window, then the update of the mean of
    the micro-batches' per-task gradients and losses, which is the full-batch update."""
    full = grad_accumulation(1, fork, flow)
    accumulated = grad_accumulation(4, fork, flow)
    torch.testing.assert_close(accumulated, full, rtol=1e-6, atol=1e-6)
    assert (full[-1] - 1).abs().max() > 1e-3


class CountOps(TorchDispatchMode):
    """Counts the aten operations that run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fork", ["none", "heads"])
def test_update_every_updates_on_every_kth_step_only_and_adds_no_work_in_between(fork):
    """update_every=3: the weights change on steps 0, 3, 6 only, as a GradNorm that sees only
    those steps; the steps in between run exactly the operations of a plain weighted step."""
    model, x, y = problem(separate_heads=fork == "heads")
    plain_model = copy.deepcopy(model)
    twin = copy.deepcopy(model)
    gn = gf.GradNorm(model.last_shared_layer, 1.5, 3, lr=0.05, dtype=torch.float64,
                     update_every=3, heads=model.heads if fork == "heads" else None)
    reference = gf.GradNorm(twin.last_shared_layer, 1.5, 3, lr=0.05, dtype=torch.float64)
    opt, twin_opt = (torch.optim.SGD(m.parameters(), lr=1e-3) for m in (model, twin))
    for t in range(9):
        before = gn.w_i
        ops = CountOps()
        with ops:
            loss = gn(per_task_mse(model(x), y))
            loss.backward()
        twin_loss = (reference.w_i * per_task_mse(twin(x), y)).sum()
        if t % 3 == 0:
            reference.step(per_task_mse(twin(x), y))
        twin_loss.backward()
        if t % 3:
            plain = CountOps()
            with plain:
                (before * per_task_mse(plain_model(x), y)).sum().backward()
            assert ops.count == plain.count
            assert gn.w_i is before
        for o in (opt, twin_opt):
            o.step()
            o.zero_grad()
        plain_model.zero_grad()
        torch.testing.assert_close(gn.w_i, reference.w_i, rtol=1e-9, atol=1e-12)
    assert int(gn.update_count) == 3


def test_prior_weights_keep_their_sum_and_match_the_oracle():
    model, x, y = problem()
    prior = [0.5, 2.0, 1.0]
    gn = gf.GradNorm(model.last_shared_layer, 1.5, 3, lr=0.05, dtype=torch.float64,
                     initial_weights=prior)
    oracle = NaiveGradNorm(3, alpha=1.5, lr=0.05, optimizer="adam", initial_weights=prior)
    torch.testing.assert_close(gn.w_i, torch.tensor(prior, dtype=torch.float64))
    for _ in range(8):
        L_i = per_task_mse(model(x), y)
        expected = oracle.step(L_i.tolist(), oracle.norms(L_i, list(
            model.last_shared_layer.parameters())))
        gn(per_task_mse(model(x), y)).backward()
        torch.testing.assert_close(gn.w_i, torch.tensor(expected, dtype=torch.float64),
                                   rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gn.w_i.sum(), torch.tensor(3.5, dtype=torch.float64))


def test_one_set_of_defaults_and_one_name_for_the_warm_up():
    """GradNorm and init_state share their defaults (Adam at 0.025); the warm-up is
    warmup_steps in both, and the seed's lr_warmup (keyword or 5th positional) still works."""
    layer = nn.Linear(3, 3)
    defaults = gf.init_state(2, alpha=0.5)
    for gn in (gf.GradNorm(layer, 0.5, 2), gf.GradNorm(layer, 0.5, 2, 0.025, 0)):
        for a, b in zip(gn.state.hyper, defaults.hyper):
            assert torch.equal(a, b)
    seed_style = gf.GradNorm(layer, 0.5, 2, 1e-3, lr_warmup=100)
    positional = gf.GradNorm(layer, 0.5, 2, 1e-3, 100)
    named = gf.GradNorm(layer, 0.5, 2, lr=1e-3, warmup_steps=100)
    for gn in (seed_style, positional, named):
        assert float(gn.state.hyper.warmup_steps) == 100
    with pytest.raises(TypeError, match="warmup_steps"):
        gf.GradNorm(layer, 0.5, 2, warmup_steps=10, lr_warmup=10)


class WithGradNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = ToyMultiTaskNet(3, input_dim=6, hidden=16, depth=2, output_dim=2)
        self.gradnorm = gf.GradNorm(self.net.last_shared_layer, 1.5, 3)


def test_the_module_state_travels_with_its_parent():
    """As a child module: no parameters, buffers in the parent's state_dict under gradnorm.*,
    no duplicate of the shared layer, moves with .to(device), keeps its dtype under casts."""
    parent = WithGradNorm()
    assert list(parent.gradnorm.parameters()) == []
    assert {id(p) for p in parent.parameters()} == {id(p) for p in parent.net.parameters()}
    keys = parent.state_dict().keys()
    assert "gradnorm.weights" in keys and "gradnorm.hyper.alpha" in keys
    assert not any(k.startswith("gradnorm.") and "last_shared_layer" in k for k in keys)
    x, y = toy_regression(SIGMAS, 16, input_dim=6, output_dim=2, seed=1)
    parent.gradnorm(per_task_mse(parent.net(x), y)).backward()
    saved = copy.deepcopy(parent.state_dict())
    fresh = WithGradNorm()
    fresh.load_state_dict(saved)
    for name, value in fresh.gradnorm.state_dict().items():
        assert torch.equal(value, saved[f"gradnorm.{name}"]), name
    assert int(fresh.gradnorm.update_count) == 1
    parent.double()
    assert parent.gradnorm.weights.dtype == torch.float32
    parent.to(torch.bfloat16)
    assert parent.gradnorm.hyper.lr.dtype == torch.float32
    assert parent.gradnorm.update_count.dtype == torch.int64
    parent.to("meta")
    assert parent.gradnorm.weights.device.type == "meta"


def test_forward_only_returns_the_weighted_sum_in_eval_and_without_grad():
    model, x, y = problem()
    gn = gf.GradNorm(model.last_shared_layer, 1.5, 3, dtype=torch.float64)
    gn.eval()
    L_i = per_task_mse(model(x), y)
    loss = gn(L_i)
    torch.testing.assert_close(loss, L_i.sum())
    loss.backward()
    gn.train()
    with torch.no_grad():
        gn(per_task_mse(model(x), y))
    assert int(gn.update_count) == 0 and int(gn.state_dict()["steps"]) == 0


def test_weights_are_replaced_not_mutated():
    model, x, y = problem()
    gn = gf.GradNorm(model.last_shared_layer, 1.5, 3, lr=0.5)
    before = gn.w_i
    snapshot = before.clone()
    loss = gn(per_task_mse(model(x), y))
    loss.backward()
    assert torch.equal(before, snapshot) and not torch.equal(gn.w_i, snapshot)
    assert not gn.w_i.requires_grad


def test_metrics_are_a_flat_dict_of_detached_scalars():
    model, x, y = problem()
    gn = gf.GradNorm(model.last_shared_layer, 1.5, 3)
    gn(per_task_mse(model(x), y)).backward()
    metrics = gn.metrics()
    expected = ({f"gradnorm/w_{i}" for i in range(3)} | {f"gradnorm/grad_norm_{i}" for i in range(3)}
                | {f"gradnorm/loss_ratio_{i}" for i in range(3)}
                | {"gradnorm/loss_grad", "gradnorm/updates", "gradnorm/skipped_updates"})
    assert set(metrics) == expected
    for value in metrics.values():
        assert isinstance(value, Tensor) and value.dim() == 0 and not value.requires_grad
    torch.testing.assert_close(torch.stack([metrics[f"gradnorm/w_{i}"] for i in range(3)]), gn.w_i)
    assert float(metrics["gradnorm/updates"]) == 1


def test_checkpoint_resume_is_bit_identical(tmp_path):
    def run(steps: int, resume_from=None):
        model, x, y = problem()
        gn = gf.GradNorm(model.last_shared_layer, 1.5, 3, lr=0.05, accumulation_steps=2,
                         update_every=2)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        if resume_from is not None:
            ckpt = torch.load(resume_from)
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
            gn.load_state_dict(ckpt["gradnorm"])
        for _ in range(steps):
            for half in (slice(0, 16), slice(16, 32)):
                gn(per_task_mse(model(x[half]), y[half])).backward()
            opt.step()
            opt.zero_grad()
        return model, opt, gn

    _, _, full = run(12)
    model, opt, gn = run(5)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gradnorm": gn.state_dict()},
               tmp_path / "ckpt.pt")
    _, _, resumed = run(7, resume_from=tmp_path / "ckpt.pt")
    for name, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    assert int(full.update_count) == 6


def test_calling_it_twice_on_the_same_losses_is_refused():
    """Two calls on one L_i would count two micro-batches and two updates for one backward."""
    model, x, y = problem()
    gn = gf.GradNorm(model.last_shared_layer, 1.5, 3)
    L_i = per_task_mse(model(x), y)
    loss = gn(L_i)
    with pytest.raises(RuntimeError, match="already called on these losses"):
        gn(L_i)
    loss.backward()
    assert int(gn.update_count) == 1


def test_a_checkpoint_without_gradnorm_entries_reports_them_missing():
    """A model checkpoint written before GradNorm was added: missing keys under strict=False,
    the usual error under strict=True."""
    parent = WithGradNorm()
    old = {k: v for k, v in parent.state_dict().items() if not k.startswith("gradnorm.")}
    result = parent.load_state_dict(old, strict=False)
    assert "gradnorm.weights" in result.missing_keys and not result.unexpected_keys
    with pytest.raises(RuntimeError, match="Missing key"):
        parent.load_state_dict(old)
