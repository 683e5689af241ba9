"""Bad configuration and bad inputs raise clear errors; non-finite steps are skipped."""

from __future__ import annotations

import math

import optree
import pytest
import torch

import gradnorm_func as gf


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_tasks=0), "num_tasks.*0"),
    (dict(num_tasks=2.0), "num_tasks.*2.0"),
    (dict(num_tasks=2, alpha=-0.5), "alpha.*-0.5"),
    (dict(num_tasks=2, alpha=math.nan), "alpha.*nan"),
    (dict(num_tasks=2, lr=0.0), "lr.*0.0"),
    (dict(num_tasks=2, lr=-1.0), "lr.*-1.0"),
    (dict(num_tasks=2, optimizer="rmsprop"), "optimizer.*rmsprop"),
    (dict(num_tasks=2, warmup_steps=-3), "warmup_steps.*-3"),
    (dict(num_tasks=2, initial_losses=[1.0, 2.0, 3.0]), r"initial_losses.*\(2,\).*\(3,\)"),
    (dict(num_tasks=2, initial_losses=[1.0, 0.0]), "initial_losses.*positive"),
    (dict(num_tasks=2, initial_losses=[1.0, math.inf]), "initial_losses.*positive"),
    (dict(num_tasks=2, min_weight=0.0), "min_weight.*0.0"),
    (dict(num_tasks=2, min_weight=1.5), "min_weight.*1.5"),
    (dict(num_tasks=2, betas=(0.9, 1.0)), r"betas\[1\].*1.0"),
    (dict(num_tasks=2, eps=0.0), "eps.*0.0"),
    (dict(num_tasks=2, dtype=torch.int64), "dtype"),
])
def test_bad_configuration_names_the_value(kwargs, match):
    num_tasks = kwargs.pop("num_tasks")
    with pytest.raises(ValueError, match=match):
        gf.init_state(num_tasks, **kwargs)


def test_losses_of_wrong_shape_are_rejected():
    state = gf.init_state(3)
    w = torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"shape \(3,\).*\(2,\)"):
        gf.step(state, w, lambda p: p.sum(0))
    with pytest.raises(ValueError, match=r"shape \(3,\).*\(4, 2\)"):
        gf.gradnorm_loss(state, w, lambda p: p)
    with pytest.raises(TypeError, match="Tensor"):
        gf.step(state, w, lambda p: [p.sum()] * 3)
    with pytest.raises(ValueError, match=r"grads.*\(3,\).*\(2,\)"):
        gf.update(state, torch.ones(2))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("where", ["loss", "norm"])
def test_non_finite_step_leaves_state_unchanged(bad, where):
    state = gf.init_state(3, optimizer="adam", lr=0.1)
    state, _ = gf.step_from_norms(state, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 5.0, 2.0]))
    losses = torch.tensor([1.0, 1.5, 2.0])
    norms = torch.tensor([1.0, 4.0, 3.0])
    (losses if where == "loss" else norms)[1] = bad
    new_state, aux = gf.step_from_norms(state, losses, norms)
    assert not bool(aux.finite)
    optree.tree_map(lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0), new_state, state)
    # The next finite step proceeds from the untouched state.
    after, aux = gf.step_from_norms(new_state, losses.nan_to_num(1.0, 1.0), norms.nan_to_num(1.0, 1.0))
    assert bool(aux.finite) and int(after.update_count) == 2


def test_first_step_non_finite_does_not_record_initial_losses():
    state = gf.init_state(2)
    state, aux = gf.step_from_norms(state, torch.tensor([math.nan, 1.0]), torch.ones(2))
    assert torch.isnan(state.initial_losses).all() and int(state.update_count) == 0
    state, _ = gf.step_from_norms(state, torch.tensor([4.0, 1.0]), torch.ones(2))
    torch.testing.assert_close(state.initial_losses, torch.tensor([4.0, 1.0]))


def test_empty_shared_params_are_rejected():
    with pytest.raises(ValueError, match="empty"):
        gf.step(gf.init_state(2), {}, lambda p: torch.ones(2))


def test_state_round_trips_through_a_dict(tmp_path):
    state = gf.init_state(3, alpha=0.12, optimizer="sgd", initial_losses=[1.0, 2.0, 3.0])
    state, _ = gf.step_from_norms(state, torch.tensor([0.5, 2.0, 1.0]), torch.tensor([1.0, 2.0, 3.0]))
    torch.save(gf.state_to_dict(state), tmp_path / "state.pt")
    restored = gf.state_from_dict(torch.load(tmp_path / "state.pt"))
    optree.tree_map(lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0), restored, state)
