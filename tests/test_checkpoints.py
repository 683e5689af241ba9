"""Checkpoints are validated and copied, by ``state_from_dict`` and ``GradNorm.load_state_dict``.

Every loader applies the rules of ``init_state`` to every entry and raises ``ValueError`` or
``TypeError`` naming the key, before anything changes; a loaded state never aliases the
caller's tensors. Three loaders are checked against one table of bad entries: the functional
``state_from_dict``, ``GradNorm.load_state_dict``, and a parent module's ``load_state_dict``
holding a GradNorm as an attribute (the Lightning / ``PreTrainedModel`` case).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import pytest
import torch
from torch import nn

import gradnorm_func as gf

T = 3
NEW_KEYS = ("skipped_count", "skipped", "hyper.weight_sum")  # absent from old checkpoints


def trained_state() -> gf.GradNormState:
    """A state after a few updates and one skip: L_i(0) recorded, Adam moments non-zero."""
    state = gf.init_state(T, lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gf.SkippedUpdateWarning)  # the NaN step below
        for losses, norms in (([1.0, 2.0, 3.0], [1.0, 5.0, 2.0]), ([0.9, 1.5, 2.9], [1.0, 4.0, 2.5]),
                              ([math.nan, 1.0, 1.0], [1.0, 1.0, 1.0]),
                              ([0.8, 1.2, 2.8], [1.1, 3.0, 2.0])):
            state, _ = gf.step_from_norms(state, torch.tensor(losses), torch.tensor(norms))
    return state


def checkpoint() -> dict[str, Any]:
    """The flat dict a GradNorm of T tasks saves: ``state_to_dict`` keys (plus ``steps``)."""
    return {k: v.clone() for k, v in gf.state_to_dict(trained_state()).items()}


class Model(nn.Module):
    """A parent module holding its GradNorm as an attribute, as a LightningModule would."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.gradnorm = gf.GradNorm(self.shared, 1.5, T, lr=0.1)


def load_functional(flat: Any) -> gf.GradNormState:
    return gf.state_from_dict(flat)


def load_module(flat: Any) -> gf.GradNormState:
    gn = gf.GradNorm(nn.Linear(4, 4), 1.5, T, lr=0.1)
    gn.load_state_dict(flat)
    return gn.state


def load_parent(flat: Any) -> gf.GradNormState:
    model = Model()
    saved = model.state_dict()
    prefixed = {k: v for k, v in saved.items() if not k.startswith("gradnorm.")}
    prefixed.update({f"gradnorm.{k}": v for k, v in flat.items()} if isinstance(flat, dict) else {})
    model.load_state_dict(prefixed)
    return model.gradnorm.state


LOADERS: dict[str, Callable[[Any], gf.GradNormState]] = {
    "state_from_dict": load_functional,
    "GradNorm.load_state_dict": load_module,
    "parent module load_state_dict": load_parent,
}


def assert_states_equal(a: gf.GradNormState, b: gf.GradNormState) -> None:
    for key, value in gf.state_to_dict(b).items():
        got = gf.state_to_dict(a)[key]
        assert got.dtype == value.dtype, key
        torch.testing.assert_close(got, value, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{key}: {m}")


def with_entry(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(flat: dict[str, Any]) -> None:
        flat[key] = value
    return edit


def without(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda flat: flat.pop(key)


BAD_ENTRIES: list[tuple[str, Callable[[dict[str, Any]], None], type, str]] = [
    ("NaN weight", with_entry("weights", torch.tensor([1.0, math.nan, 2.0])), ValueError,
     r"'weights' must be finite and positive, got \[1\.0, nan, 2\.0\]"),
    ("inf weight", with_entry("weights", torch.tensor([math.inf, 1.0, 2.0])), ValueError,
     r"'weights' must be finite and positive"),
    ("negative weight (sum still 3)", with_entry("weights", torch.tensor([-1.0, 2.0, 2.0])), ValueError,
     r"'weights' must be finite and positive, got \[-1\.0, 2\.0, 2\.0\]"),
    ("zero weight", with_entry("weights", torch.tensor([0.0, 1.5, 1.5])), ValueError,
     r"'weights' must be finite and positive"),
    ("weights summing to 4, not 3", with_entry("weights", torch.tensor([1.0, 1.0, 2.0])), ValueError,
     r"'weights' must sum to hyper\.weight_sum = 3\.0, got 4\.0"),
    ("weights of shape (1, 3)", with_entry("weights", torch.ones(1, 3)), ValueError,
     r"'weights' must have shape \(T,\) with T >= 1, got \(1, 3\)"),
    ("no weights at all (shape (0,))", with_entry("weights", torch.ones(0)), ValueError,
     r"'weights' must have shape \(T,\) with T >= 1, got \(0,\)"),
    ("int64 weights", with_entry("weights", torch.ones(T, dtype=torch.int64)), TypeError,
     r"'weights' must be float32 or float64, got torch\.int64"),
    ("float16 weights", with_entry("weights", torch.ones(T, dtype=torch.float16)), TypeError,
     r"'weights' must be float32 or float64, got torch\.float16"),
    ("bfloat16 weights", with_entry("weights", torch.ones(T, dtype=torch.bfloat16)), TypeError,
     r"'weights' must be float32 or float64, got torch\.bfloat16"),
    ("weights as a list of floats", with_entry("weights", [1.0, 1.0, 1.0]), TypeError,
     r"'weights' must be a Tensor, got list"),
    ("weights as a string", with_entry("weights", "1,1,1"), TypeError,
     r"'weights' must be a Tensor, got str"),
    ("a zero initial loss", with_entry("initial_losses", torch.tensor([1.0, 0.0, 2.0])), ValueError,
     r"'initial_losses' .*must be finite and positive, got \[1\.0, 0\.0, 2\.0\]"),
    ("a negative initial loss", with_entry("initial_losses", torch.tensor([1.0, -2.0, 2.0])), ValueError,
     r"'initial_losses' .*must be finite and positive"),
    ("initial losses partly recorded", with_entry("initial_losses", torch.tensor([1.0, math.nan, 2.0])),
     ValueError, r"'initial_losses' \(or all NaN: not yet recorded\) must be finite and positive"),
    ("initial losses of shape (2,)", with_entry("initial_losses", torch.ones(2)), ValueError,
     r"'initial_losses' must have shape \(3,\), got \(2,\)"),
    ("int64 initial losses", with_entry("initial_losses", torch.ones(T, dtype=torch.int64)), TypeError,
     r"'initial_losses' must be float32 or float64, got torch\.int64"),
    ("NaN first moment", with_entry("exp_avg", torch.tensor([0.0, math.nan, 0.0])), ValueError,
     r"'exp_avg' must be finite, got \[0\.0, nan, 0\.0\]"),
    ("negative second moment", with_entry("exp_avg_sq", torch.tensor([0.1, -0.1, 0.1])), ValueError,
     r"'exp_avg_sq' must be finite and >= 0"),
    ("infinite second moment", with_entry("exp_avg_sq", torch.tensor([0.1, math.inf, 0.1])), ValueError,
     r"'exp_avg_sq' must be finite and >= 0"),
    ("moments of shape (4,)", with_entry("exp_avg", torch.zeros(4)), ValueError,
     r"'exp_avg' must have shape \(3,\), got \(4,\)"),
    ("negative update count", with_entry("update_count", torch.tensor(-1)), ValueError,
     r"'update_count' must be >= 0, got -1"),
    ("float update count", with_entry("update_count", torch.tensor(3.0)), TypeError,
     r"'update_count' must be an integer tensor, got torch\.float32"),
    ("update count of shape (1,)", with_entry("update_count", torch.tensor([3])), ValueError,
     r"'update_count' must have shape \(\), got \(1,\)"),
    ("negative skip count", with_entry("skipped_count", torch.tensor(-3)), ValueError,
     r"'skipped_count' must be >= 0, got -3"),
    ("integer skip flag", with_entry("skipped", torch.tensor(1)), TypeError,
     r"'skipped' must be a bool tensor, got torch\.int64"),
    ("NaN alpha", with_entry("hyper.alpha", torch.tensor(math.nan)), ValueError,
     r"'hyper\.alpha' must be finite and in \[0\.0, inf\), got nan"),
    ("negative alpha", with_entry("hyper.alpha", torch.tensor(-1.0)), ValueError, r"'hyper\.alpha' .* got -1\.0"),
    ("alpha of shape (1,)", with_entry("hyper.alpha", torch.tensor([1.5])), ValueError,
     r"'hyper\.alpha' must have shape \(\), got \(1,\)"),
    ("zero lr", with_entry("hyper.lr", torch.tensor(0.0)), ValueError, r"'hyper\.lr' .* got 0\.0"),
    ("infinite lr", with_entry("hyper.lr", torch.tensor(math.inf)), ValueError, r"'hyper\.lr' .* got inf"),
    ("fractional warm-up", with_entry("hyper.warmup_steps", torch.tensor(2.5)), ValueError,
     r"'hyper\.warmup_steps' must be a whole number, got 2\.5"),
    ("negative warm-up", with_entry("hyper.warmup_steps", torch.tensor(-1.0)), ValueError,
     r"'hyper\.warmup_steps' .* got -1\.0"),
    ("float use_adam", with_entry("hyper.use_adam", torch.tensor(1.0)), TypeError,
     r"'hyper\.use_adam' must be a bool tensor, got torch\.float32"),
    ("beta1 = 1", with_entry("hyper.beta1", torch.tensor(1.0)), ValueError, r"'hyper\.beta1' .* got 1\.0"),
    ("beta2 = 1", with_entry("hyper.beta2", torch.tensor(1.0)), ValueError,
     r"'hyper\.beta2' must be finite and in \[0\.0, 1\.0\), got 1\.0"),
    ("zero eps", with_entry("hyper.eps", torch.tensor(0.0)), ValueError, r"'hyper\.eps' .* got 0\.0"),
    ("zero min_weight", with_entry("hyper.min_weight", torch.tensor(0.0)), ValueError,
     r"'hyper\.min_weight' .* got 0\.0"),
    ("min_weight above the mean weight", with_entry("hyper.min_weight", torch.tensor(2.0)), ValueError,
     r"'hyper\.min_weight' must be finite and in \[.*, 1\.0\], got 2\.0"),
    ("NaN weight_sum", with_entry("hyper.weight_sum", torch.tensor(math.nan)), ValueError,
     r"'hyper\.weight_sum' .* got nan"),
    ("negative weight_sum", with_entry("hyper.weight_sum", torch.tensor(-3.0)), ValueError,
     r"'hyper\.weight_sum' .* got -3\.0"),
    ("weight_sum that the weights do not have", with_entry("hyper.weight_sum", torch.tensor(4.0)),
     ValueError, r"'weights' must sum to hyper\.weight_sum = 4\.0, got 3\.0"),
    ("no weights entry", without("weights"), ValueError, r"the GradNorm state dict has no entry 'weights'"),
    ("no lr entry", without("hyper.lr"), ValueError, r"the GradNorm state dict has no entry 'hyper\.lr'"),
    ("no second moment entry", without("exp_avg_sq"), ValueError, r"no entry 'exp_avg_sq'"),
]


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("name,edit,error,match", BAD_ENTRIES, ids=[e[0] for e in BAD_ENTRIES])
def test_a_bad_entry_raises_naming_its_key(name, edit, error, match, loader):
    """Each corrupted or hand-edited entry raises the error of the init_state rule it breaks,
    naming the key and the value it holds."""
    flat = checkpoint()
    edit(flat)
    with pytest.raises(error, match=match):
        LOADERS[loader](flat)


@pytest.mark.parametrize("loader", list(LOADERS))
def test_a_dict_of_floats_or_strings_is_rejected(loader):
    """A checkpoint converted to plain numbers or strings (e.g. through JSON) names the first
    entry that is not a tensor."""
    with pytest.raises(TypeError, match=r"'weights' must be a Tensor, got list"):
        LOADERS[loader]({k: v.tolist() for k, v in checkpoint().items()})
    with pytest.raises(TypeError, match=r"'weights' must be a Tensor, got str"):
        LOADERS[loader]({k: str(v.tolist()) for k, v in checkpoint().items()})


@pytest.mark.parametrize("flat", [None, [1.0, 1.0, 1.0], torch.ones(3), "weights"],
                         ids=["None", "list", "tensor", "str"])
def test_state_from_dict_needs_a_mapping(flat):
    """Anything but a mapping of names to tensors raises a TypeError naming what it got."""
    with pytest.raises(TypeError, match=rf"must be a mapping of names to tensors, got {type(flat).__name__}"):
        gf.state_from_dict(flat)


@pytest.mark.parametrize("loader", ["GradNorm.load_state_dict", "parent module load_state_dict"])
def test_a_failed_load_leaves_the_live_state_untouched(loader):
    """Validation comes before any copy: after a bad checkpoint the GradNorm keeps its state."""
    model = Model()
    gn = model.gradnorm
    gn.load_state_dict(checkpoint())
    before = {k: v.clone() for k, v in gn.state_dict().items()}
    flat = checkpoint()
    flat["weights"] = torch.tensor([1.0, 1.0, 1.0])  # valid on its own ...
    flat["exp_avg_sq"] = torch.tensor([0.1, -0.1, 0.1])  # ... but this entry is not
    with pytest.raises(ValueError, match="'exp_avg_sq'"):
        if loader == "GradNorm.load_state_dict":
            gn.load_state_dict(flat)
        else:
            model.load_state_dict({**model.state_dict(), **{f"gradnorm.{k}": v for k, v in flat.items()}})
    for key, value in gn.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("loader", ["GradNorm.load_state_dict", "parent module load_state_dict"])
def test_a_checkpoint_of_another_task_count_is_rejected(loader):
    """A checkpoint of T = 2 tasks loaded into a GradNorm of T = 3 names both counts."""
    other = gf.GradNorm(nn.Linear(4, 4), 1.5, 2).state_dict()
    with pytest.raises(ValueError, match=r"the checkpoint holds 2 task weights, this GradNorm has number_of_tasks=3"):
        if loader == "GradNorm.load_state_dict":
            gf.GradNorm(nn.Linear(4, 4), 1.5, T).load_state_dict(other)
        else:
            model = Model()
            model.load_state_dict({**model.state_dict(), **{f"gradnorm.{k}": v for k, v in other.items()}})


@pytest.mark.parametrize("steps", [torch.tensor(-1), torch.tensor([2]), 3.0], ids=["negative", "shape (1,)", "float"])
def test_the_wrapper_step_counter_is_validated(steps):
    """GradNorm's own ``steps`` entry (its window counter) must be a non-negative 0-d tensor."""
    flat = {**gf.GradNorm(nn.Linear(4, 4), 1.5, T).state_dict(), "steps": steps}
    with pytest.raises(ValueError, match=r"'steps' must be a non-negative 0-d tensor"):
        gf.GradNorm(nn.Linear(4, 4), 1.5, T).load_state_dict(flat)


# ---------------------------------------------------------------------------- good checkpoints
@pytest.mark.parametrize("loader", list(LOADERS))
def test_a_saved_state_round_trips_bit_identically(loader, tmp_path):
    """state_to_dict, torch.save, torch.load and a loader give back the very same state."""
    state = trained_state()
    torch.save(gf.state_to_dict(state), tmp_path / "state.pt")
    restored = LOADERS[loader](torch.load(tmp_path / "state.pt"))
    assert_states_equal(restored, state)


@pytest.mark.parametrize("loader", list(LOADERS))
def test_the_loaded_state_never_aliases_the_checkpoint(loader):
    """Issue reproducer: ``sd["weights"].fill_(-5)`` after loading must not reach the live
    weights; nor may loading change the caller's dict."""
    flat = checkpoint()
    saved = {k: v.clone() for k, v in flat.items()}
    loaded = LOADERS[loader](flat)
    for key, value in flat.items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0, equal_nan=True)  # untouched
        value.fill_(-5 if value.dtype != torch.bool else True)
    assert_states_equal(loaded, gf.state_from_dict(saved))


@pytest.mark.parametrize("loader", list(LOADERS))
def test_an_old_checkpoint_loads_with_defaults(loader):
    """A checkpoint written before ``skipped_count``, ``skipped`` and ``hyper.weight_sum``
    existed (the previous release's keys) loads with 0, False and T."""
    state = trained_state()
    flat = {k: v for k, v in gf.state_to_dict(state).items() if k not in NEW_KEYS}
    loaded = LOADERS[loader](flat)
    assert int(loaded.skipped_count) == 0 and not bool(loaded.skipped)
    assert float(loaded.hyper.weight_sum) == T
    for key in ("weights", "initial_losses", "update_count", "exp_avg", "exp_avg_sq", "hyper.alpha"):
        torch.testing.assert_close(gf.state_to_dict(loaded)[key], gf.state_to_dict(state)[key],
                                   rtol=0, atol=0, equal_nan=True)


def test_loading_converts_dtype_and_detaches():
    """A float64 checkpoint loads into a float32 GradNorm as float32 (and state_from_dict takes
    dtype=); a weight tensor that requires grad is copied without its history."""
    flat = checkpoint()
    flat64 = {k: v.double() if v.is_floating_point() else v for k, v in flat.items()}
    flat64["weights"] = flat64["weights"].clone().requires_grad_(True)
    gn = gf.GradNorm(nn.Linear(4, 4), 1.5, T)
    gn.load_state_dict(flat64)
    assert gn.weights.dtype == torch.float32 and not gn.weights.requires_grad
    state = gf.state_from_dict(flat, dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in (state.weights, state.exp_avg, state.hyper.alpha))
    assert not gf.state_from_dict(flat64).weights.requires_grad
    with pytest.raises(ValueError, match=r"dtype must be torch\.float32 or torch\.float64, got torch\.float16"):
        gf.state_from_dict(flat, dtype=torch.float16)


def test_unrecorded_initial_losses_and_extra_keys_are_accepted():
    """L_i(0) all NaN means "not yet recorded"; keys that are not part of the state are ignored."""
    flat = gf.state_to_dict(gf.init_state(T))
    state = gf.state_from_dict({**flat, "optimizer": torch.zeros(2), "epoch": 7})
    assert bool(torch.isnan(state.initial_losses).all())


def test_a_parent_module_loads_an_old_checkpoint_strictly():
    """``model.load_state_dict(sd, strict=True)`` with a GradNorm saved by the previous
    release (no skipped_count, skipped, hyper.weight_sum, steps) reports no missing key."""
    model = Model()
    saved = model.state_dict()
    old = {k: v for k, v in saved.items()
           if not any(k == f"gradnorm.{key}" for key in (*NEW_KEYS, "steps"))}
    assert len(old) < len(saved)
    result = model.load_state_dict(old, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_a_checkpoint_resumes_the_skip_count():
    """The skip count and flag survive a checkpoint, so logs continue from where they were."""
    state = trained_state()
    assert int(state.skipped_count) == 1
    gn = gf.GradNorm(nn.Linear(4, 4), 1.5, T)
    gn.load_state_dict(gf.state_to_dict(state))
    assert float(gn.metrics()["gradnorm/skipped_updates"]) == 1.0
    assert float(gn.metrics()["gradnorm/updates"]) == float(state.update_count)
