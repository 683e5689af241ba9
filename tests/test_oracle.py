"""The library's functional step against the naive Algorithm 1 in ``oracle.py``."""

from __future__ import annotations

import pytest
import torch
from drifting import SHARED, DriftingTasks
from oracle import NaiveGradNorm

import gradnorm_func as gf

CONFIGS = [
    (num_tasks, alpha, optimizer, lr, warmup, prior)
    for num_tasks in (2, 3, 7)
    for alpha in (0.0, 0.12, 1.5)
    for optimizer, lr, warmup in (("sgd", 0.02, 0), ("adam", 0.025, 5))
    for prior in (False, True)
]


@pytest.mark.parametrize("num_tasks,alpha,optimizer,lr,warmup,prior", CONFIGS)
def test_step_matches_naive_algorithm_1(num_tasks, alpha, optimizer, lr, warmup, prior):
    """30 steps of drifting losses: norms to 1e-10 and weights to 1e-9 of the float64 oracle,
    with w_i(0) = 1 (the paper) or positive prior weights whose sum is kept."""
    tasks = DriftingTasks(num_tasks, seed=num_tasks * 100 + int(alpha * 100))
    initial = [0.5 + 0.4 * i for i in range(num_tasks)] if prior else None
    oracle = NaiveGradNorm(num_tasks, alpha=alpha, lr=lr, optimizer=optimizer, warmup_steps=warmup,
                           initial_weights=initial)
    state = gf.init_state(num_tasks, alpha=alpha, lr=lr, optimizer=optimizer,
                          warmup_steps=warmup, initial_weights=initial, dtype=torch.float64)
    names = SHARED
    ratio_spread = 0.0
    for _ in range(30):
        params = tasks.params()
        shared = {k: params[k] for k in names}

        def losses(p):
            return tasks.losses_with({**params, **p})

        leaf_params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        losses_live = tasks.losses_with(leaf_params)
        expected_norms = oracle.norms(losses_live, [leaf_params[k] for k in names])
        expected = oracle.step(losses_live.tolist(), expected_norms)

        old_weights = state.weights
        state, aux = gf.step(state, shared, losses)
        torch.testing.assert_close(aux.grad_norms, torch.tensor(expected_norms, dtype=torch.float64),
                                   rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(state.weights, torch.tensor(expected, dtype=torch.float64),
                                   rtol=1e-9, atol=1e-12)
        ratio_spread = max(ratio_spread, float(aux.loss_ratios.max() / aux.loss_ratios.min()))
        tasks.advance(old_weights)
    # The ratios really drift apart, so an inverted exponent r^-alpha would be caught.
    assert ratio_spread > 1.5
    if num_tasks > 1 and alpha > 0:
        assert not torch.allclose(state.weights, torch.ones(num_tasks, dtype=torch.float64))
    total = sum(initial) if prior else num_tasks
    torch.testing.assert_close(state.weights.sum(), torch.tensor(total, dtype=torch.float64))


def test_design_card_two_call_form_equals_step():
    """gradnorm_loss, its gradient in the weights by torch.func.grad, then update(aux=aux):
    the same states as step(), L_i(0) recorded on the first call."""
    tasks = DriftingTasks(3, seed=11)
    state_a = state_b = gf.init_state(3, alpha=1.5, dtype=torch.float64)
    for _ in range(10):
        params = tasks.params()
        shared = {k: params[k] for k in SHARED}

        def losses(p):
            return tasks.losses_with({**params, **p})

        grads, aux = torch.func.grad(
            lambda w: gf.gradnorm_loss(state_b._replace(weights=w), shared, losses),
            has_aux=True)(state_b.weights)
        state_b = gf.update(state_b, grads, aux=aux)
        old = state_a.weights
        state_a, _ = gf.step(state_a, shared, losses)
        for a, b in zip(gf.state_to_dict(state_a).values(), gf.state_to_dict(state_b).values()):
            torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-12, atol=1e-12)
        tasks.advance(old)
    assert not torch.isnan(state_b.initial_losses).any()


def test_update_without_aux_fails_loudly():
    """update(state, grads) alone would never record L_i(0): it raises, saying what to pass."""
    state = gf.init_state(2)
    with pytest.raises(TypeError, match=r"update\(state, grads, aux=aux\)"):
        gf.update(state, torch.ones(2))


def test_inverted_exponent_would_be_caught():
    """Sanity check of the oracle comparison: r^-alpha gives visibly different weights."""
    tasks = DriftingTasks(3, seed=7)
    good = NaiveGradNorm(3, alpha=1.5, lr=0.05, optimizer="sgd")
    bad = NaiveGradNorm(3, alpha=-1.5, lr=0.05, optimizer="sgd")
    names = SHARED
    for _ in range(20):
        params = {k: v.clone().requires_grad_(True) for k, v in tasks.params().items()}
        losses = tasks.losses_with(params)
        norms = good.norms(losses, [params[k] for k in names])
        w = good.step(losses.tolist(), norms)
        w_bad = bad.step(losses.tolist(), norms)
        tasks.advance(torch.tensor(w, dtype=torch.float64))
    assert max(abs(a - b) for a, b in zip(w, w_bad)) > 1e-2


def test_gradient_of_loss_grad_is_sign_times_norm_and_never_reaches_params():
    tasks = DriftingTasks(4, seed=3)
    tasks.t = 5
    state = gf.init_state(4, alpha=1.5, dtype=torch.float64,
                          initial_losses=torch.tensor([0.5, 2.0, 30.0, 900.0]))
    params = {k: v.clone().requires_grad_(True) for k, v in tasks.params().items()}
    shared = {k: params[k] for k in SHARED}
    weights = torch.tensor([0.5, 1.5, 0.7, 1.3], dtype=torch.float64, requires_grad=True)
    loss_grad, aux = gf.gradnorm_loss(state._replace(weights=weights), shared,
                                      lambda p: tasks.losses_with({**params, **p}))
    grads = torch.autograd.grad(loss_grad, [weights, *params.values()], allow_unused=True)
    expected = torch.sign(aux.weighted_norms - aux.targets) * aux.grad_norms
    torch.testing.assert_close(grads[0], expected)
    assert all(g is None for g in grads[1:])
    torch.testing.assert_close(loss_grad.detach(), (aux.weighted_norms - aux.targets).abs().sum())


def test_functional_accumulation_of_4_micro_batches_equals_the_full_batch():
    """task_gradients on 4 micro-batches of 25, averaged, then step_from_gradients: the update
    of step() on the batch of 100 (float64, 1e-6)."""
    tasks = DriftingTasks(3, seed=5, batch=100)
    full = accumulated = gf.init_state(3, alpha=1.5, dtype=torch.float64)
    for _ in range(6):
        params = tasks.params()
        shared = {k: params[k] for k in SHARED}
        full, _ = gf.step(full, shared, lambda p: tasks.losses_with({**params, **p}))
        x, y = tasks.x, tasks.y
        sum_losses, sum_grads = torch.zeros(3, dtype=torch.float64), None
        for rows in torch.arange(100).split(25):
            tasks.x, tasks.y = x[rows], y[rows]
            losses, grads = gf.task_gradients(
                shared, lambda p: tasks.losses_with({**params, **p}), num_tasks=3)
            sum_losses = sum_losses + losses
            sum_grads = grads if sum_grads is None else {k: sum_grads[k] + g
                                                         for k, g in grads.items()}
        tasks.x, tasks.y = x, y
        accumulated, _ = gf.step_from_gradients(
            accumulated, sum_losses / 4, {k: g / 4 for k, g in sum_grads.items()})
        torch.testing.assert_close(accumulated.weights, full.weights, rtol=1e-6, atol=1e-6)
        tasks.advance(full.weights)
    assert (full.weights - 1).abs().max() > 1e-3
