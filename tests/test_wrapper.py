"""The stateful GradNorm: both flows, exact model gradients, the oracle, checkpoints, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from multitask import MultiTaskNet, task_data, task_losses
from oracle import NaiveGradNorm

from gradnorm_func import GradNorm


def train(flow: str, steps: int = 15, num_tasks: int = 3, **options):
    """Runs ``steps`` SGD steps with GradNorm; returns weights and model-grad checks."""
    torch.manual_seed(0)
    model = MultiTaskNet(num_tasks).double()
    x, y = task_data(num_tasks, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    gn = GradNorm(model.shared, 1.5, num_tasks, lr=0.05, **options)
    history = []
    for _ in range(steps):
        opt.zero_grad()
        L_i = task_losses(model, x, y)
        w_old = gn.w_i
        loss = (w_old * L_i).sum()
        reference = copy.deepcopy(model)  # independent gradient of sum_i w_i(t) L_i
        ref_loss = (w_old.clone() * task_losses(reference, x, y)).sum()
        ref_grads = torch.autograd.grad(ref_loss, list(reference.parameters()))
        if flow == "seed":
            loss.backward(retain_graph=True)
            gn.apply_grads(gn.gradnorm(L_i))
        elif flow == "recommended":
            gn.step(L_i)
            loss.backward()
        else:  # backward after the GradNorm call, in the seed's API
            L_grad = gn.gradnorm(L_i)
            gn.apply_grads(L_grad)
            loss.backward()
        for p, g in zip(model.parameters(), ref_grads):
            assert torch.equal(p.grad, g)  # bit-exact: GradNorm never alters model grads
        opt.step()
        history.append(gn.w_i)
    return torch.stack(history), gn


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_both_flows_give_the_same_weights_and_exact_model_gradients(optimizer):
    seed_w, _ = train("seed", optimizer=optimizer)
    rec_w, _ = train("recommended", optimizer=optimizer)
    late_w, _ = train("seed-api-before-backward", optimizer=optimizer)
    torch.testing.assert_close(rec_w, seed_w, rtol=0, atol=0)
    torch.testing.assert_close(late_w, seed_w, rtol=0, atol=0)
    assert (seed_w[-1] - 1).abs().max() > 1e-2


def test_wrapper_matches_naive_algorithm_1():
    num_tasks = 4
    model = MultiTaskNet(num_tasks).double()
    x, y = task_data(num_tasks, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    gn = GradNorm(model.shared, 0.12, num_tasks, lr=0.02, lr_warmup=3, optimizer="adam",
                  dtype=torch.float64)
    oracle = NaiveGradNorm(num_tasks, alpha=0.12, lr=0.02, optimizer="adam", warmup_steps=3)
    for _ in range(20):
        opt.zero_grad()
        L_i = task_losses(model, x, y)
        loss = (gn.w_i * L_i).sum()
        expected = oracle.step(L_i.tolist(), oracle.norms(L_i, list(model.shared.parameters())))
        gn.step(L_i)
        loss.backward()
        opt.step()
        torch.testing.assert_close(gn.w_i, torch.tensor(expected, dtype=torch.float64),
                                   rtol=1e-9, atol=1e-12)


def test_weights_are_replaced_not_mutated():
    model = MultiTaskNet(2)
    x, y = task_data(2)
    gn = GradNorm(model.shared, 1.5, 2, lr=0.5)
    before = gn.w_i
    snapshot = before.clone()
    gn.step(task_losses(model, x, y))
    assert torch.equal(before, snapshot) and not torch.equal(gn.w_i, snapshot)
    assert not gn.w_i.requires_grad


def test_checkpoint_resume_is_bit_identical(tmp_path):
    full, _ = train("recommended", steps=12, optimizer="adam")

    torch.manual_seed(0)
    num_tasks = 3
    model = MultiTaskNet(num_tasks).double()
    x, y = task_data(num_tasks, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    gn = GradNorm(model.shared, 1.5, num_tasks, lr=0.05, optimizer="adam")

    def one_step(gn, model, opt):
        opt.zero_grad()
        L_i = task_losses(model, x, y)
        loss = (gn.w_i * L_i).sum()
        gn.step(L_i)
        loss.backward()
        opt.step()

    for _ in range(5):
        one_step(gn, model, opt)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gradnorm": gn.state_dict()},
               tmp_path / "ckpt.pt")

    ckpt = torch.load(tmp_path / "ckpt.pt")
    model2 = MultiTaskNet(num_tasks).double()
    model2.load_state_dict(ckpt["model"])
    opt2 = torch.optim.SGD(model2.parameters(), lr=1e-3)
    opt2.load_state_dict(ckpt["opt"])
    gn2 = GradNorm(model2.shared, 1.5, num_tasks, lr=0.05, optimizer="adam")
    gn2.load_state_dict(ckpt["gradnorm"])
    resumed = []
    for _ in range(7):
        one_step(gn2, model2, opt2)
        resumed.append(gn2.w_i)
    assert torch.equal(torch.stack(resumed), full[5:])


def test_apply_grads_lr_override_is_for_one_call():
    model = MultiTaskNet(2)
    x, y = task_data(2)
    gn = GradNorm(model.shared, 1.5, 2, lr=1e-3)
    gn.apply_grads(gn.gradnorm(task_losses(model, x, y)), lr=0.5)
    big_move = (gn.w_i - 1).abs().max()
    assert big_move > 1e-2
    assert float(gn.state.hyper.lr) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="lr.*-0.5"):
        gn.apply_grads(gn.gradnorm(task_losses(model, x, y)), lr=-0.5)


def test_errors_name_the_problem():
    model = MultiTaskNet(3)
    x, y = task_data(3)
    gn = GradNorm(model.shared, 1.5, 3)
    with pytest.raises(ValueError, match=r"shape \(3,\).*\(2,\)"):
        gn.step(task_losses(model, x, y)[:2])
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        GradNorm(frozen, 1.5, 3)
    unrelated = torch.nn.Linear(2, 2)
    gn_bad = GradNorm([model.shared.weight, unrelated.weight], 1.5, 3)
    with pytest.raises(ValueError, match=r"layer\[1\]"):
        gn_bad.step(task_losses(model, x, y))
    gn_fork = GradNorm([model.shared.weight, unrelated.weight], 1.5, 3, heads=model.heads)
    with pytest.raises(ValueError, match=r"layer\[1\]"):  # fast path, before the backward
        gn_fork.step(task_losses(model, x, y))
    L_i = task_losses(model, x, y)
    (gn_fork.w_i * L_i).sum().backward()
    with pytest.raises(ValueError, match=r"layer\[1\]"):  # fast path, after the backward
        gn_fork.step(L_i)
    with pytest.raises(RuntimeError, match="gradnorm"):
        gn.apply_grads(torch.tensor(0.0))
    with pytest.raises(ValueError, match="num_tasks.*0"):
        GradNorm(model.shared, 1.5, 0)


def test_nan_loss_skips_update_and_training_continues():
    model = MultiTaskNet(2)
    x, y = task_data(2)
    gn = GradNorm(model.shared, 1.5, 2, lr=0.5)
    gn.step(task_losses(model, x, y))
    before = gn.state
    gn.step(task_losses(model, x, y) * torch.tensor([float("nan"), 1.0]))
    assert not bool(gn.aux.finite)
    assert torch.equal(gn.w_i, before.weights) and torch.equal(gn.state.update_count, before.update_count)
