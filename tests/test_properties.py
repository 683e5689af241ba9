"""Invariants of the functional core, checked with hypothesis."""

from __future__ import annotations

import math

import optree
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradnorm_func as gf
from gradnorm_func._gradients import gradient_norms

positive = st.floats(1e-3, 1e3, allow_nan=False, allow_infinity=False)


@st.composite
def trajectories(draw, min_tasks=1, max_tasks=8):
    """A configuration plus a sequence of (losses, norms) per step."""
    num_tasks = draw(st.integers(min_tasks, max_tasks))
    steps = draw(st.integers(1, 12))
    losses = [draw(st.lists(positive, min_size=num_tasks, max_size=num_tasks)) for _ in range(steps)]
    norms = [draw(st.lists(positive, min_size=num_tasks, max_size=num_tasks)) for _ in range(steps)]
    config = dict(
        alpha=draw(st.sampled_from([0.0, 0.12, 1.5, 3.0])),
        lr=draw(st.floats(1e-3, 5.0)),
        optimizer=draw(st.sampled_from(["sgd", "adam"])),
        warmup_steps=draw(st.integers(0, 5)),
        min_weight=draw(st.sampled_from([1e-6, 1e-3, 0.1])),
    )
    return (num_tasks, config, torch.tensor(losses, dtype=torch.float64),
            torch.tensor(norms, dtype=torch.float64))


def run(num_tasks, config, losses, norms, dtype=torch.float64):
    state = gf.init_state(num_tasks, dtype=dtype, **config)
    for step_losses, step_norms in zip(losses, norms):
        state, _ = gf.step_from_norms(state, step_losses, step_norms)
    return state


@given(trajectories(), st.data())
def test_weights_stay_positive_and_keep_their_sum(case, data):
    """Every update leaves positive weights summing to S: T, or the sum of the prior weights."""
    num_tasks, config, losses, norms = case
    prior = data.draw(st.none() | st.lists(st.floats(0.05, 5.0), min_size=num_tasks,
                                           max_size=num_tasks))
    total = float(num_tasks) if prior is None else sum(prior)
    config["min_weight"] = min(config["min_weight"], total / num_tasks)
    state = gf.init_state(num_tasks, dtype=torch.float32, initial_weights=prior, **config)
    for step_losses, step_norms in zip(losses, norms):
        state, _ = gf.step_from_norms(state, step_losses, step_norms)
        assert not bool(state.skipped)
        assert bool((state.weights > 0).all())
        torch.testing.assert_close(state.weights.sum(), torch.tensor(total), rtol=1e-5, atol=1e-5)
    assert int(state.update_count) == len(losses)


@given(trajectories(min_tasks=2), st.randoms(use_true_random=False))
def test_permuting_tasks_permutes_weights(case, rng):
    num_tasks, config, losses, norms = case
    perm = list(range(num_tasks))
    rng.shuffle(perm)
    base = run(num_tasks, config, losses, norms)
    permuted = run(num_tasks, config, losses[:, perm], norms[:, perm])
    torch.testing.assert_close(permuted.weights, base.weights[perm], rtol=1e-9, atol=1e-9)


@given(trajectories(max_tasks=1), st.integers(2, 8))
def test_identical_tasks_keep_identical_weights(case, num_tasks):
    _, config, losses, norms = case
    state = run(num_tasks, config, losses.expand(-1, num_tasks), norms.expand(-1, num_tasks))
    torch.testing.assert_close(state.weights, torch.ones(num_tasks, dtype=torch.float64))


@given(trajectories(), st.floats(1e-3, 1e3), st.data())
def test_scaling_one_task_loss_leaves_ratios_unchanged(case, scale, data):
    num_tasks, config, losses, norms = case
    task = data.draw(st.integers(0, num_tasks - 1))
    scaled = losses.clone()
    scaled[:, task] *= scale
    state_a = gf.init_state(num_tasks, dtype=torch.float64, **config)
    state_b = state_a
    for la, lb, n in zip(losses, scaled, norms):
        state_a, aux_a = gf.step_from_norms(state_a, la, n)
        state_b, aux_b = gf.step_from_norms(state_b, lb, n)
        torch.testing.assert_close(aux_b.loss_ratios, aux_a.loss_ratios, rtol=1e-9, atol=0)


@given(st.integers(1, 5), st.sampled_from(["sgd", "adam"]))
def test_inputs_are_not_mutated_and_state_has_no_history(num_tasks, optimizer):
    layer = torch.nn.Linear(3, num_tasks)
    x = torch.randn(5, 3)
    params = dict(layer.named_parameters())  # require grad, as in a real model
    before_params = {k: v.detach().clone() for k, v in params.items()}
    state = gf.init_state(num_tasks, optimizer=optimizer, lr=0.1)
    before_state = optree.tree_map(torch.clone, state)

    def losses(p):
        return (torch.func.functional_call(layer, p, (x,)) ** 2).mean(0)

    new_state = state
    for _ in range(3):
        new_state, aux = gf.step(new_state, params, losses)
    optree.tree_map(lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True),
                    state, before_state)
    for k, v in params.items():
        assert torch.equal(v, before_params[k])
    for leaf in optree.tree_leaves((new_state, aux)):
        assert not leaf.requires_grad and leaf.grad_fn is None
    assert not new_state.weights._is_view()


@given(st.integers(1, 4), st.integers(1, 40), st.integers(-45, 37), st.integers(0, 2**32 - 1))
def test_gradient_norms_are_exact_over_the_whole_float32_range(num_tasks, size, exponent, seed):
    """||g_i|| over a weight and a bias leaf of float32 gradients at any scale, 1e-45 (where
    every square underflows) to 1e37 (where every square overflows), equals math.hypot of
    the entries to float32 precision; in the ordinary range it is taken in float32."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_tasks, size, 3, generator=gen) * 10.0 ** exponent
    bias = torch.randn(num_tasks, size, generator=gen) * 10.0 ** exponent
    expected = torch.tensor([math.hypot(*w.flatten().tolist(), *b.tolist())
                             for w, b in zip(weight, bias)], dtype=torch.float64)
    norms = gradient_norms([weight, bias])
    torch.testing.assert_close(norms.double(), expected, rtol=1e-6, atol=0)
    if 1e-10 <= float(expected.min()) and float(expected.max()) <= 1e18:
        assert norms.dtype == torch.float32
