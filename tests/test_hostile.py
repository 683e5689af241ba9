"""The hostile-input matrix: every kind of bad input has one exact outcome, in every API.

Each row of the tables below is one kind of bad input and states its outcome once:

* ``APPLIED``: valid weights (finite, positive, summing to the configured total S) equal to an
  independent float64 computation of Algorithm 1 (``oracle.NaiveGradNorm``, fed with the same
  losses and with per-task norms from a naive loop of ``torch.autograd.grad``);
* a regex: the update is skipped (weights, Adam moments, L_i(0) and the update
  count unchanged, ``skipped`` set, ``skipped_count`` + 1) and a ``SkippedUpdateWarning``
  whose message matches the regex (it names the tasks) comes on the 1st, 2nd, 4th, 8th, ...
  skip and on no other step;
* an exception type and a regex: that exception, whose message names the argument and the
  bad value, with the state unchanged.

A small adapter per API runs each row: the functional ``step_from_norms``, ``step`` and
``gradnorm_loss`` + ``update``, and the five flows of ``GradNorm``: ``loss = gn(L_i)`` with no
fork, with ``heads=`` and with the stacked ``gn.fork``; ``gn.step(L_i)`` before the backward;
and the seed library's ``backward(retain_graph=True)`` then ``apply_grads(gradnorm(L_i))``.
Bad checkpoints are in ``test_checkpoints.py``; a NaN on one rank and ranks that disagree on
T are in ``test_distributed.py``. ``docs/bad_input.md`` summarises all of it.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pytest
import torch
from oracle import NaiveGradNorm
from torch import Tensor, nn
from torch.func import functional_call
from versions import needs_cpu_grad_scaler, needs_cpu_half_matmul, needs_fullgraph_compile

import gradnorm_func as gf
from gradnorm_func.repro.toy import ToyMultiTaskNet, per_task_mse, toy_regression

SIGMAS = [1.0, 10.0, 100.0]
FUNCTIONAL = ["step_from_norms", "step", "gradnorm_loss+update"]
FORWARD_FLOWS = ["gn(L_i)", "gn(L_i) heads=", "gn(L_i) fork"]
WRAPPER = [*FORWARD_FLOWS, "gn.step before backward", "seed flow"]
APIS = FUNCTIONAL + WRAPPER


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models here are tiny: one intra-op thread is faster, and immune to other processes
    on a small shared machine (an idle OpenMP thread spins). Restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- the adapters
def naive_norms(losses: Tensor, shared: Sequence[Tensor]) -> list[float]:
    """||grad_W L_i|| by a loop of autograd.grad, in float64; 0 for a loss that ignores W."""
    out = []
    for i in range(losses.shape[0]):
        if not losses[i].requires_grad:
            out.append(0.0)
            continue
        grads = torch.autograd.grad(losses[i], list(shared), retain_graph=True, allow_unused=True)
        out.append(math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads if g is not None)))
    return out


class Run:
    """One API driving GradNorm on a small toy model (never trained, so every step's losses
    and norms are reproducible): ``step(make, k)`` takes one GradNorm step on batch k with the
    task losses ``make(L_i)``; ``reference(make, k)`` gives what an independent computation of
    that step needs, the losses and their naive norms."""

    def __init__(self, api: str, num_tasks: int = 3, **options: Any) -> None:
        torch.manual_seed(0)
        self.api, self.num_tasks = api, num_tasks
        self.model = ToyMultiTaskNet(num_tasks, input_dim=8, hidden=16, depth=2, output_dim=4,
                                     separate_heads=api == "gn(L_i) heads=")
        self.x, self.y = toy_regression(torch.tensor(SIGMAS[:num_tasks]), 96, input_dim=8,
                                        output_dim=4, seed=0)
        self.shared = list(self.model.last_shared_layer.parameters())
        alpha = options.pop("alpha", 1.5)
        options.setdefault("lr", 0.1)
        if api in FUNCTIONAL:
            self.functional_state = gf.init_state(num_tasks, alpha=alpha, **options)
            self.functional_aux: gf.GradNormAux | None = None
        else:
            heads = {"heads": self.model.heads} if api == "gn(L_i) heads=" else {}
            self.gn = gf.GradNorm(self.model.last_shared_layer, alpha, num_tasks,
                                  **options, **heads)
            if api == "gn(L_i) fork":
                self.model.fork = self.gn.fork

    @property
    def state(self) -> gf.GradNormState:
        return self.functional_state if self.api in FUNCTIONAL else self.gn.state

    @property
    def aux(self) -> gf.GradNormAux | None:
        return self.functional_aux if self.api in FUNCTIONAL else self.gn.aux

    def batch(self, k: int) -> tuple[Tensor, Tensor]:
        rows = slice(4 * k, 4 * k + 32)
        return self.x[rows], self.y[rows]

    def losses(self, k: int) -> Tensor:
        x, y = self.batch(k)
        return per_task_mse(self.model(x), y)

    def reference(self, make: Callable[[Tensor], Any], k: int) -> tuple[list[float], list[float]]:
        if self.api in WRAPPER:
            self.gn.eval()  # this extra forward must leave no fork record behind
        losses = make(self.losses(k))
        if self.api in WRAPPER:
            self.gn.train()
        return losses.tolist(), naive_norms(losses, self.shared)

    def step(self, make: Callable[[Tensor], Any], k: int) -> None:
        self.model.zero_grad(set_to_none=True)
        if self.api == "step_from_norms":
            losses = make(self.losses(k))
            well_formed = (isinstance(losses, Tensor) and losses.shape == (self.num_tasks,)
                           and losses.is_floating_point())
            # with malformed losses the norms are not the point
            norms = (torch.tensor(naive_norms(losses, self.shared)) if well_formed
                     else torch.ones(self.num_tasks))
            if isinstance(losses, Tensor):
                losses = losses.detach()
            self.functional_state, self.functional_aux = gf.step_from_norms(
                self.functional_state, losses, norms)
        elif self.api in FUNCTIONAL:
            x, y = self.batch(k)
            params = {name: p.detach() for name, p in
                      self.model.last_shared_layer.named_parameters()}

            def losses_fn(p: dict[str, Tensor]) -> Any:
                named = {f"last_shared_layer.{name}": value for name, value in p.items()}
                return make(per_task_mse(functional_call(self.model, named, (x,)), y))

            state = self.functional_state
            if self.api == "step":
                self.functional_state, self.functional_aux = gf.step(state, params, losses_fn)
            else:
                grads, aux = torch.func.grad(
                    lambda w: gf.gradnorm_loss(state._replace(weights=w), params, losses_fn),
                    has_aux=True)(state.weights)
                self.functional_state, self.functional_aux = gf.update(state, grads, aux=aux), aux
        else:
            raw = self.losses(k)
            losses = make(raw)
            if self.api in FORWARD_FLOWS:
                self.gn(losses).backward()
            elif self.api == "gn.step before backward":
                loss = (self.gn.w_i * raw).sum()
                self.gn.step(losses)
                loss.backward()
            else:
                loss = (self.gn.w_i * raw).sum()
                loss.backward(retain_graph=True)
                self.gn.apply_grads(self.gn.gradnorm(losses))


def skip_messages(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, gf.SkippedUpdateWarning)]


def snapshot(state: gf.GradNormState) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in gf.state_to_dict(state).items()}


def assert_unchanged(state: gf.GradNormState, before: dict[str, Tensor],
                     keys: Sequence[str] = ("weights", "initial_losses", "update_count",
                                            "exp_avg", "exp_avg_sq")) -> None:
    after = gf.state_to_dict(state)
    for key in keys:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m, key=key: f"{key} changed: {m}")


def assert_close_to(actual: Tensor, expected: Sequence[float], *, rtol: float, atol: float = 0.0,
                    msg: Callable[[str], str] | None = None) -> None:
    """``actual`` against float64 reference values."""
    torch.testing.assert_close(actual.double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=rtol, atol=atol, msg=msg)


def assert_valid_weights(weights: Tensor, total: float) -> None:
    assert bool(torch.isfinite(weights).all() and (weights > 0).all()), weights
    assert float(weights.double().sum()) == pytest.approx(total, rel=1e-5)


# ---------------------------------------------------------------------------- hostile values
KINDS: dict[str, Callable[[Tensor], Tensor]] = {
    "ok": lambda L: L,
    "nan": lambda L: L * math.nan,
    "inf": lambda L: L * math.inf,
    "-inf": lambda L: L * -math.inf,
    "zero": lambda L: L - L.detach(),  # exactly 0, gradient kept
    "negative": lambda L: -L,  # below 0, gradient kept
    "detached": lambda L: L.detach(),  # does not depend on W: its norm is 0
    # finite loss whose gradient overflows (inf, nan where dL_i/dW is 0); an exact 0 * inf would
    # make every task's gradient nan, so the product is formed from two finite factors
    "inf-grad": lambda L: L + (L - L.detach()) * 3e38 * 3e38,
    "tiny": lambda L: L * 1e-30,  # finite and positive, squares underflow float32
    "huge": lambda L: L * 1e20,  # finite and positive, squares overflow float32
}


VECTOR_KINDS: dict[str, Callable[[Tensor], Tensor]] = {
    "float16": lambda L: L.half(),  # half-precision losses from a float32 model
    "bfloat16": lambda L: L.bfloat16(),
}


def transform(kinds: tuple[str, ...] | str) -> Callable[[Tensor], Tensor]:
    """The losses of a step: one kind per task, or one kind for the whole vector."""
    if isinstance(kinds, str):
        return VECTOR_KINDS[kinds]
    return lambda L: torch.stack([KINDS[kind](L[i]) for i, kind in enumerate(kinds)])


APPLIED = None


@dataclass
class Case:
    name: str
    steps: list[tuple[tuple[str, ...] | str, str | None]]  # (kinds, None or skip regex)
    options: dict[str, Any] = field(default_factory=dict)
    num_tasks: int = 3


OK = (("ok", "ok", "ok"), APPLIED)
LOSS = r"the loss of task\(s\) {} is not finite and positive \({}\)"
NORM = r"the gradient norm at W of task\(s\) {} is not finite and positive"
OVERFLOW = (r"the squared gradient norms \(up to [\d.e+]+\) overflow the state's dtype in "
            r"Adam's second moment: pass dtype=torch.float64")
RESULT = (r"the new weights were not finite, positive normal numbers \(L_grad = {}\): lower lr "
          r"or alpha, or raise min_weight")

VALUE_CASES = [
    Case("nan loss at the first step", [
        (("ok", "nan", "ok"), LOSS.format(r"\[1\]", r"\[nan\]")), OK, OK]),
    Case("inf loss at the first step", [
        (("inf", "ok", "ok"), LOSS.format(r"\[0\]", r"\[inf\]")), OK, OK]),
    Case("inf loss at a later step", [
        OK, (("ok", "ok", "inf"), LOSS.format(r"\[2\]", r"\[inf\]")), OK]),
    Case("-inf loss at a later step", [
        OK, (("-inf", "ok", "ok"), LOSS.format(r"\[0\]", r"\[-inf\]")), OK]),
    Case("nan in every loss", [
        (("nan",) * 3, LOSS.format(r"\[0, 1, 2\]", r"\[nan, nan, nan\]")), OK, OK]),
    Case("zero loss at the first step is never recorded as L_i(0)", [
        (("ok", "zero", "ok"), LOSS.format(r"\[1\]", r"\[0\.0\]")), OK, OK]),
    Case("zero loss at a later step", [
        OK, (("zero", "ok", "ok"), LOSS.format(r"\[0\]", r"\[0\.0\]")), OK]),
    Case("negative losses (a log-likelihood) at the first two steps", [
        (("negative", "negative", "ok"), LOSS.format(r"\[0, 1\]", r"\[-[\d.]+, -[\d.]+\]")),
        (("ok", "negative", "ok"), LOSS.format(r"\[1\]", r"\[-[\d.]+\]")), OK, OK]),
    Case("a task loss that does not depend on W", [
        OK, (("ok", "ok", "detached"),
             NORM.format(r"\[2\]") + r" \(\[0\.0\]\); a zero norm means W is not shared by "
             r"task\(s\) \[2\]"), OK]),
    Case("finite loss whose gradient at W is not finite", [
        OK, (("ok", "inf-grad", "ok"), NORM.format(r"\[1\]")), OK]),
    Case("tiny losses (one task x 1e-30)", [(("tiny", "ok", "ok"), APPLIED)] * 3),
    Case("huge losses (one task x 1e20): Adam's g^2 overflows a float32 state", [
        (("ok", "huge", "ok"), OVERFLOW)] * 2),
    Case("huge losses (one task x 1e20) in a float64 state", [(("ok", "huge", "ok"), APPLIED)] * 3,
         options=dict(dtype=torch.float64)),
    Case("17 NaN steps in a row warn on the 1st, 2nd, 4th, 8th and 16th", [
        (("nan", "ok", "ok"), LOSS.format(r"\[0\]", r"\[nan\]"))] * 17 + [OK]),
    Case("half-precision losses (float16, bfloat16) from a float32 model", [
        ("float16", APPLIED), ("bfloat16", APPLIED), ("float16", APPLIED)]),
    Case("one task (T = 1)", [(("ok",), APPLIED)] * 3, num_tasks=1),
    Case("alpha = 0", [OK] * 3, options=dict(alpha=0.0)),
    Case("alpha = 1e6 overflows the targets once the ratios leave 1", [
        OK, (OK[0], RESULT.format("inf")), (OK[0], RESULT.format("inf"))],
        options=dict(alpha=1e6)),
    Case("SGD with lr = 1e30 (weights at the floor)", [OK] * 3,
         options=dict(optimizer="sgd", lr=1e30)),
    Case("SGD with lr = 1e-30", [OK] * 3, options=dict(optimizer="sgd", lr=1e-30)),
    Case("Adam with lr = 1e30", [OK] * 3, options=dict(lr=1e30)),
    Case("float64 weights that would underflow to 0 (lr = 1e300, min_weight = 1e-300)", [
        (OK[0], RESULT.format(r"[\d.e+]+"))] * 2,
        options=dict(dtype=torch.float64, optimizer="sgd", lr=1e300, min_weight=1e-300)),
    Case("a NaN step during a warm start (initial_weights, sum 4)", [
        OK, (("ok", "nan", "ok"), LOSS.format(r"\[1\]", r"\[nan\]")), OK],
        options=dict(initial_weights=[0.5, 1.0, 2.5])),
    Case("zero loss with given initial losses", [
        (("zero", "ok", "ok"), LOSS.format(r"\[0\]", r"\[0\.0\]")), OK],
        options=dict(initial_losses=[0.5, 40.0, 3000.0])),
]


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("case", VALUE_CASES, ids=lambda c: c.name)
def test_bad_loss_values(case: Case, api: str) -> None:
    """Each step is either applied, with the weights of an independent computation, or skipped
    with the state unchanged, the flag and count set, and a warning naming the tasks."""
    run = Run(api, case.num_tasks, **dict(case.options))
    oracle_options = {k: v for k, v in case.options.items() if k != "dtype"}
    oracle = NaiveGradNorm(case.num_tasks, alpha=oracle_options.pop("alpha", 1.5),
                           lr=oracle_options.pop("lr", 0.1),
                           optimizer=oracle_options.pop("optimizer", "adam"), **oracle_options)
    total = sum(case.options.get("initial_weights", [1.0] * case.num_tasks))
    skips = applied = 0
    for k, (kinds, skip) in enumerate(case.steps):
        make = transform(kinds)
        before = snapshot(run.state)
        reference = run.reference(make, k) if skip is None else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run.step(make, k)
        messages = skip_messages(caught)
        state = run.state
        if skip is None:
            applied += 1
            assert not bool(state.skipped), f"step {k} was skipped: {messages}"
            assert int(state.skipped_count) == skips and int(state.update_count) == applied
            assert messages == [], f"step {k}: {messages}"
            assert reference is not None
            losses, norms = reference
            expected = oracle.step(losses, norms)
            assert_valid_weights(state.weights, total)
            assert_close_to(state.weights, expected, rtol=1e-4, atol=1e-6,
                            msg=lambda m: f"step {k}: {m}")
            assert_close_to(state.initial_losses, oracle.L0, rtol=1e-6, atol=0)
            assert run.aux is not None
            assert_close_to(run.aux.grad_norms, norms, rtol=1e-4, atol=0)
        else:
            skips += 1
            assert bool(state.skipped) and int(state.skipped_count) == skips, f"step {k}"
            assert_unchanged(state, before)
            if skips & (skips - 1) == 0:  # the 1st, 2nd, 4th, 8th, ... skip
                assert len(messages) == 1, f"step {k}: {messages}"
                assert f"({skips} skipped, {applied} applied so far)" in messages[0]
                assert re.search(skip, messages[0]), (skip, messages[0])
            else:
                assert messages == [], f"step {k}: {messages}"
    if api in WRAPPER:
        metrics = run.gn.metrics()
        assert float(metrics["gradnorm/skipped_updates"]) == skips
        assert float(metrics["gradnorm/updates"]) == applied


# ---------------------------------------------------------------------------- malformed losses
NAMES = {"step_from_norms": "task_losses", "step": r"losses_fn\(params\)",
         "gradnorm_loss+update": r"losses_fn\(params\)", **{api: "L_i" for api in WRAPPER}}
ONE_PER_TASK = r" must have shape \(3,\), one value per task, got "
MALFORMED = [
    ("losses of the wrong length", lambda L: L[:2], ValueError, ONE_PER_TASK + r"\(2,\)"),
    ("losses with an extra axis", lambda L: L[None], ValueError, ONE_PER_TASK + r"\(1, 3\)"),
    ("one loss already summed over tasks", lambda L: L.sum(), ValueError, ONE_PER_TASK + r"\(\)"),
    ("losses as a list of tensors", lambda L: list(L.unbind()), TypeError,
     r" must be a Tensor of shape \(3,\), one value per task, got list"),
    ("losses as a NumPy array", lambda L: np.ones(tuple(L.shape), dtype=np.float32), TypeError,
     r" must be a Tensor of shape \(3,\), one value per task, got ndarray"),
    ("integer losses", lambda L: L.detach().round().long(), ValueError,
     r" must be floating point, got torch.int64"),
    ("complex losses", lambda L: L.to(torch.complex64), ValueError,
     r" must be floating point, got torch.complex64"),
]


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("name,make,error,match", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_losses_raise_naming_the_argument(name, make, error, match, api):
    """Losses of the wrong shape, type or dtype raise GradNorm's own error, naming the argument
    and what it got; the state is unchanged and the next good step is applied."""
    run = Run(api)
    before = snapshot(run.state)
    with pytest.raises(error, match=NAMES[api] + match):
        run.step(make, 0)
    assert_unchanged(run.state, before, keys=list(before))
    run.step(transform(("ok", "ok", "ok")), 1)
    assert int(run.state.update_count) == 1 and not bool(run.state.skipped)


@pytest.mark.parametrize("api", APIS)
def test_losses_without_a_graph(api):
    """Losses that do not depend on W at all: the functional API skips, naming every task (its
    norms are 0); the wrapper raises, naming L_i, before any backward."""
    run = Run(api)
    before = snapshot(run.state)
    if api in FUNCTIONAL:
        with pytest.warns(gf.SkippedUpdateWarning, match=NORM.format(r"\[0, 1, 2\]") +
                          r" \(\[0\.0, 0\.0, 0\.0\]\); a zero norm means W is not shared"):
            run.step(lambda L: L.detach(), 0)
        assert bool(run.state.skipped) and int(run.state.skipped_count) == 1
        assert_unchanged(run.state, before)
    else:
        with pytest.raises(ValueError, match=r"L_i has no autograd graph"):
            run.step(lambda L: L.detach(), 0)
        assert_unchanged(run.state, before, keys=list(before))


# ---------------------------------------------------------------------------- issue reproducers
def test_a_zero_first_loss_is_never_recorded_as_the_initial_loss():
    """Issue reproducer: a loss of exactly 0 at the first step skips it; L_i(0) comes from the
    first applied step and the weights never collapse."""
    state = gf.init_state(3, alpha=0.12, optimizer="sgd", lr=0.01)
    with pytest.warns(gf.SkippedUpdateWarning, match=LOSS.format(r"\[1\]", r"\[0\.0\]")):
        state, _ = gf.step_from_norms(state, torch.tensor([0.5, 0.0, 2.0]), torch.ones(3))
    for _ in range(500):
        state, _ = gf.step_from_norms(state, torch.tensor([0.4, 0.3, 1.5]), torch.ones(3))
    torch.testing.assert_close(state.initial_losses, torch.tensor([0.4, 0.3, 1.5]))
    torch.testing.assert_close(state.weights, torch.ones(3))  # ratios 1, equal norms: no move
    assert (int(state.update_count), int(state.skipped_count)) == (500, 1)


def test_negative_losses_are_skipped_not_inverted():
    """Issue reproducer: [-1, -1] then [-2, -1.1] would lower the lagging task's weight; both
    steps are skipped, naming the tasks, and the weights stay put."""
    state = gf.init_state(2, alpha=1.5, optimizer="sgd", lr=0.1)
    for losses, match in (([-1.0, -1.0], r"\[0, 1\].*\(\[-1\.0, -1\.0\]\)"),
                          ([-2.0, -1.1], r"\[0, 1\].*\(\[-2\.0, -1\.1")):
        with pytest.warns(gf.SkippedUpdateWarning, match=match):
            state, aux = gf.step_from_norms(state, torch.tensor(losses), torch.tensor([1.0, 2.0]))
        assert not bool(aux.valid_losses.any())
    torch.testing.assert_close(state.weights, torch.ones(2))
    assert (int(state.update_count), int(state.skipped_count)) == (0, 2)


def test_alpha_1e6_skips_instead_of_a_nan_loss_grad():
    """Issue reproducer: alpha = 1e6 overflows the targets; the update is skipped, never NaN."""
    state = gf.init_state(3, alpha=1e6, optimizer="sgd", lr=0.01)
    state, _ = gf.step_from_norms(state, torch.tensor([0.5, 1.0, 2.0]), torch.ones(3))
    before = snapshot(state)
    with pytest.warns(gf.SkippedUpdateWarning, match=RESULT.format("inf")):
        state, aux = gf.step_from_norms(state, torch.tensor([0.4, 0.3, 1.5]), torch.ones(3))
    assert bool(state.skipped) and not bool(torch.isfinite(aux.loss_grad))
    assert_unchanged(state, before)


def test_update_checks_its_inputs_and_its_result():
    """update needs aux, a Tensor[T] of grads, and skips when the new weights are not finite."""
    state = gf.init_state(3)
    state, aux = gf.step_from_norms(state, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0]))
    grads = torch.tensor([1.0, -1.0, 0.5])
    with pytest.raises(TypeError, match=r"update needs the aux .* aux=aux"):
        gf.update(state, grads)
    with pytest.raises(ValueError, match=r"grads must have shape \(3,\), one value per task, got \(2,\)"):
        gf.update(state, grads[:2], aux=aux)
    with pytest.raises(TypeError, match=r"grads must be a Tensor of shape \(3,\).*got list"):
        gf.update(state, [1.0, -1.0, 0.5], aux=aux)
    before = snapshot(state)
    with pytest.warns(gf.SkippedUpdateWarning, match=RESULT.format(r"[\d.]+")):
        after = gf.update(state, torch.tensor([math.nan, -1.0, 0.5]), aux=aux)
    assert bool(after.skipped) and int(after.skipped_count) == 1
    assert_unchanged(after, before)


def test_step_from_norms_checks_the_norms():
    """Norms of the wrong shape or type raise naming grad_norms; NaN or 0 norms skip."""
    state = gf.init_state(3)
    losses = torch.tensor([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"grad_norms must have shape \(3,\), one value per task, got \(3, 1\)"):
        gf.step_from_norms(state, losses, torch.ones(3, 1))
    with pytest.raises(TypeError, match=r"grad_norms must be a Tensor .* got list"):
        gf.step_from_norms(state, losses, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"grad_norms must be floating point, got torch.int64"):
        gf.step_from_norms(state, losses, torch.ones(3, dtype=torch.int64))
    with pytest.warns(gf.SkippedUpdateWarning, match=NORM.format(r"\[0, 2\]") + r" \(\[nan, -1\.0\]\)"):
        state, _ = gf.step_from_norms(state, losses, torch.tensor([math.nan, 1.0, -1.0]))


def test_empty_shared_parameters_are_rejected():
    """A step over no tensors at all raises, in every functional entry point."""
    state = gf.init_state(2)
    with pytest.raises(ValueError, match="shared parameters are empty"):
        gf.step(state, {}, lambda p: torch.ones(2))
    with pytest.raises(ValueError, match="shared parameters are empty"):
        gf.task_gradients({}, lambda p: torch.ones(2), num_tasks=2)
    with pytest.raises(ValueError, match="shared parameters are empty"):
        gf.step_from_gradients(state, torch.ones(2), {})


@pytest.mark.parametrize("dtype", [torch.int64, torch.float16, torch.bfloat16])
def test_a_state_of_the_wrong_dtype_is_rejected_by_the_step(dtype):
    """A hand-built state (``state._replace(weights=...)``) whose weights are not float32 or
    float64 raises init_state's ValueError for the dtype, naming ``state.weights.dtype``, not
    a torch internal error."""
    state = gf.init_state(3)
    bad = state._replace(weights=torch.ones(3, dtype=dtype))
    with pytest.raises(ValueError, match=rf"state\.weights\.dtype\) must be torch\.float32 or torch\.float64, got {dtype}"):
        gf.step_from_norms(bad, torch.tensor([1.0, 2.0, 3.0]), torch.ones(3))


# ---------------------------------------------------------------------------- configuration
LAYER_DIM = 4


def construct(where: str, num_tasks: Any = 3, **kwargs: Any) -> Any:
    if where == "init_state":
        return gf.init_state(num_tasks, **kwargs)
    alpha = kwargs.pop("alpha", 1.5)
    return gf.GradNorm(nn.Linear(LAYER_DIM, LAYER_DIM), alpha, num_tasks, **kwargs)


F32 = "float32 cannot hold it"
BAD_CONFIGURATION = [
    (dict(num_tasks=0), ValueError, r"num_tasks must be an integer >= 1, got 0"),
    (dict(num_tasks=2.0), ValueError, r"num_tasks .* got 2\.0"),
    (dict(num_tasks=True), ValueError, r"num_tasks .* got True"),
    (dict(alpha=-0.5), ValueError, r"alpha must be finite and in \[0\.0, inf\), got -0\.5"),
    (dict(alpha=math.nan), ValueError, r"alpha .* got nan"),
    (dict(alpha="1.5"), TypeError, r"alpha must be a real number, got '1\.5'"),
    (dict(alpha=1e39), ValueError, r"alpha .*1e\+39"),  # F32: rounds to inf
    (dict(lr=0.0), ValueError, r"lr must be finite and in \(0\.0, inf\), got 0\.0"),
    (dict(lr=-1.0), ValueError, r"lr .* got -1\.0"),
    (dict(lr=math.inf), ValueError, r"lr .* got inf"),
    (dict(lr=1e39), ValueError, r"lr .*1e\+39"),  # F32: rounds to inf
    (dict(optimizer="rmsprop"), ValueError, r"optimizer must be 'sgd' or 'adam', got 'rmsprop'"),
    (dict(warmup_steps=-3), ValueError, r"warmup_steps must be an integer >= 0, got -3"),
    (dict(warmup_steps=2.5), ValueError, r"warmup_steps .* got 2\.5"),
    (dict(betas=0.9), ValueError, r"betas must be a pair"),
    (dict(betas=(-0.1, 0.999)), ValueError, r"betas\[0\] .* got -0\.1"),
    (dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\] must be finite and in \[0\.0, 1\.0\), got 1\.0"),
    (dict(betas=(0.9, 1 - 1e-9)), ValueError, r"betas\[1\] .*0\.999999999"),  # F32: rounds to 1
    (dict(eps=0.0), ValueError, r"eps must be finite and in \(0\.0, inf\), got 0\.0"),
    (dict(eps=1e-50), ValueError, r"eps .*1e-50"),  # F32: rounds to 0
    (dict(min_weight=0.0), ValueError, r"min_weight .* got 0\.0"),
    (dict(min_weight=1.5), ValueError, r"min_weight must be finite and in .*, 1\.0\], got 1\.5"),
    (dict(min_weight=1e-300), ValueError, r"min_weight .* got 1e-300"),  # F32: rounds to 0
    (dict(initial_losses=[1.0, 2.0]), ValueError, r"initial_losses must have shape \(3,\), got \(2,\)"),
    (dict(initial_losses=[1.0, 0.0, 2.0]), ValueError, r"initial_losses must be finite and positive, got \[1\.0, 0\.0, 2\.0\]"),
    (dict(initial_losses=[1.0, -1.0, 2.0]), ValueError, r"initial_losses must be finite and positive"),
    (dict(initial_losses=[1.0, math.inf, 2.0]), ValueError, r"initial_losses must be finite and positive"),
    (dict(initial_losses=["a", "b", "c"]), TypeError, r"initial_losses must be a Tensor or a sequence of 3 numbers"),
    (dict(initial_weights=[1.0, 0.0, 2.0]), ValueError, r"initial_weights must be finite and positive"),
    (dict(initial_weights=[1.0, math.nan, 2.0]), ValueError, r"initial_weights must be finite and positive"),
    (dict(initial_weights=[1.0, 1.0]), ValueError, r"initial_weights must have shape \(3,\), got \(2,\)"),
    (dict(initial_weights=[0.3, 0.3, 0.3], min_weight=0.5), ValueError, r"min_weight .*0\.3.*got 0\.5"),
    (dict(dtype=torch.int64), ValueError, r"dtype must be torch.float32 or torch.float64, got torch.int64"),
    (dict(dtype=torch.float16), ValueError, r"dtype must be torch.float32 or torch.float64, got torch.float16"),
    (dict(dtype=torch.bfloat16), ValueError, r"dtype must be .* got torch.bfloat16.*keep it in float32"),
    (dict(dtype="float32"), TypeError, r"dtype must be a torch.dtype, got 'float32'"),
]


@pytest.mark.parametrize("where", ["init_state", "GradNorm"])
@pytest.mark.parametrize("kwargs,error,match", BAD_CONFIGURATION,
                         ids=[",".join(f"{k}={v!r}" for k, v in c[0].items()) for c in BAD_CONFIGURATION])
def test_bad_configuration_names_the_value(kwargs, error, match, where):
    """Both constructors reject a bad setting, naming it and its value; a value that the state's
    dtype would round to inf, 0 or 1 (lr, alpha = 1e39, eps, min_weight, beta2 in float32) is
    rejected too, instead of skipping every update later."""
    with pytest.raises(error, match=match):
        construct(where, **kwargs)


def test_values_the_float64_state_can_hold_are_accepted():
    """The representability rule follows the dtype: float64 holds what float32 cannot."""
    state = gf.init_state(3, dtype=torch.float64, lr=1e39, eps=1e-50, min_weight=1e-300,
                          betas=(0.9, 1 - 1e-9))
    assert float(state.hyper.lr) == 1e39 and float(state.hyper.min_weight) == 1e-300
    assert float(state.hyper.beta2) < 1.0 and float(state.hyper.eps) > 0.0


def test_apply_grads_rejects_a_learning_rate_the_state_cannot_hold():
    """The seed flow's one-off lr follows the same rules as the configured one."""
    model = ToyMultiTaskNet(3, input_dim=8, hidden=16, depth=2, output_dim=4)
    gn = gf.GradNorm(model.last_shared_layer, 1.5, 3)
    x, y = toy_regression(torch.tensor(SIGMAS), 32, input_dim=8, output_dim=4, seed=0)
    for lr, match in ((-0.5, r"lr .* got -0\.5"), (math.nan, r"lr .* got nan"), (1e39, r"lr .*1e\+39")):
        with pytest.raises(ValueError, match=match):
            gn.apply_grads(gn.gradnorm(per_task_mse(model(x), y)), lr=lr)
    assert int(gn.update_count) == 0


class NotAModule:
    pass


BAD_WRAPPER_ARGUMENTS = [
    (dict(layer="shared"), TypeError, r"layer must be an nn.Module .* got str 'shared'"),
    (dict(layer=None), TypeError, r"layer must be an nn.Module .* got NoneType None"),
    (dict(layer=3), TypeError, r"layer must be .* got int 3"),
    (dict(layer=NotAModule()), TypeError, r"layer must be .* got NotAModule"),
    (dict(layer=[1.0, 2.0]), TypeError, r"item\(s\) \[0, 1\] of the iterable are not Tensors"),
    (dict(layer={"w": torch.ones(2, requires_grad=True)}), TypeError, r"got dict"),
    (dict(layer=nn.Linear(2, 2).requires_grad_(False)), ValueError,
     r"the shared layer \(Linear\) has no parameter that requires grad"),
    (dict(layer=nn.ReLU()), ValueError, r"the shared layer \(ReLU\) has no parameter"),
    (dict(layer=[]), ValueError, r"has no parameter that requires grad"),
    (dict(warmup_steps=100, lr_warmup=5), TypeError, r"pass the warm-up once"),
    (dict(lr_warmup=-1), ValueError, r"warmup_steps must be an integer >= 0, got -1"),
    (dict(heads=[nn.Linear(4, 1)] * 2), ValueError, r"heads must hold one nn.Module per task \(3\)"),
    (dict(heads=nn.Linear(4, 1)), TypeError, r"heads must be a sequence of modules.* got Linear"),
    (dict(heads=["a", "b", "c"]), ValueError, r"heads must hold one nn.Module per task"),
    (dict(accumulation_steps=0), ValueError, r"accumulation_steps must be an integer >= 1, got 0"),
    (dict(update_every=1.5), ValueError, r"update_every must be an integer >= 1, got 1\.5"),
    (dict(sync=False, process_group=object()), ValueError, r"process_group was given with sync=False"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD_WRAPPER_ARGUMENTS,
                         ids=[",".join(f"{k}={type(v).__name__}" for k, v in c[0].items())
                              for c in BAD_WRAPPER_ARGUMENTS])
def test_bad_wrapper_arguments_name_the_problem(kwargs, error, match):
    """GradNorm's own arguments: what W can be, the warm-up alias, heads, windows, sync."""
    kwargs = dict(kwargs)
    layer = kwargs.pop("layer", nn.Linear(LAYER_DIM, LAYER_DIM))
    with pytest.raises(error, match=match):
        gf.GradNorm(layer, 1.5, 3, **kwargs)


def test_warmup_steps_and_its_seed_alias_are_the_same_setting():
    """``warmup_steps=`` and the seed's ``lr_warmup=`` both set hyper.warmup_steps."""
    layer = nn.Linear(LAYER_DIM, LAYER_DIM)
    assert float(gf.GradNorm(layer, 1.5, 3, warmup_steps=100).hyper.warmup_steps) == 100
    assert float(gf.GradNorm(layer, 1.5, 3, lr_warmup=7).hyper.warmup_steps) == 7


# ---------------------------------------------------------------------------- wrapper flows
def toy(num_tasks: int = 3, *, separate_heads: bool = False, dtype: torch.dtype = torch.float32
        ) -> tuple[ToyMultiTaskNet, Tensor, Tensor]:
    torch.manual_seed(0)
    model = ToyMultiTaskNet(num_tasks, input_dim=8, hidden=16, depth=2, output_dim=4,
                            separate_heads=separate_heads).to(dtype)
    x, y = toy_regression(torch.tensor(SIGMAS[:num_tasks]), 64, input_dim=8, output_dim=4, seed=0)
    return model, x.to(dtype), y.to(dtype)


def wrapped(flow: str, **options: Any) -> tuple[ToyMultiTaskNet, gf.GradNorm, Tensor, Tensor]:
    """A toy model and a GradNorm for one of FORWARD_FLOWS' fork modes (none, heads=, fork)."""
    model, x, y = toy(separate_heads=flow == "gn(L_i) heads=")
    heads = {"heads": model.heads} if flow == "gn(L_i) heads=" else {}
    gn = gf.GradNorm(model.last_shared_layer, options.pop("alpha", 1.5), 3,
                     **{"lr": 0.1, **options}, **heads)
    if flow == "gn(L_i) fork":
        model.fork = gn.fork
    return model, gn, x, y


FREED = r"a backward has already freed it\. Use loss = gradnorm\(L_i\) before loss\.backward\(\)"


@pytest.mark.parametrize("flow,call", [(flow, call) for flow in FORWARD_FLOWS
                                       for call in ("step", "gradnorm")] + [("gn(L_i)", "forward")])
def test_backward_then_step_raises_an_actionable_error(flow, call):
    """The old ``loss.backward(); gn.step(L_i)`` (and the seed's ``gradnorm(L_i)``, or
    ``gn(L_i)`` without a fork, after the backward) raises GradNorm's RuntimeError pointing to
    ``loss = gn(L_i)``, never torch's "backward through the graph a second time"; the state is
    unchanged. (With a fork, ``gn(L_i)`` defers its work to the backward, and a second
    ``.backward()`` through a freed graph gets torch's own error, as it would without GradNorm.)"""
    model, gn, x, y = wrapped(flow)
    L = per_task_mse(model(x), y)
    (gn.w_i * L).sum().backward()
    before = snapshot(gn.state)
    with pytest.raises(RuntimeError, match=FREED) as error:
        getattr(gn, {"forward": "__call__"}.get(call, call))(L)
    assert "second time" not in str(error.value)
    assert_unchanged(gn.state, before, keys=list(before))


@pytest.mark.parametrize("flow", FORWARD_FLOWS)
def test_stale_fork_records_raise_after_the_backward(flow):
    """An extra forward between the backward and the step, or two backwards before it, cannot
    smuggle in another batch's norms: the step on the freed losses raises."""
    model, gn, x, y = wrapped(flow)
    L1 = per_task_mse(model(x[:32]), y[:32])
    (gn.w_i * L1).sum().backward()
    per_task_mse(model(x[32:]), y[32:])  # an extra forward, e.g. a validation batch
    with pytest.raises(RuntimeError, match=FREED):
        gn.step(L1)
    L2 = per_task_mse(model(x[32:]), y[32:])
    (gn.w_i * L2).sum().backward()
    with pytest.raises(RuntimeError, match=FREED):
        gn.step(L1)
    assert int(gn.update_count) == 0 and int(gn.skipped_count) == 0


@pytest.mark.parametrize("call", ["step", "forward"])
@pytest.mark.parametrize("flow", FORWARD_FLOWS)
def test_two_forwards_use_the_norms_of_the_losses_given(flow, call):
    """With two forwards pending, ``gn.step(L1)`` and ``gn(L1)`` take the norms of batch 1,
    the batch L1 belongs to, not of the latest forward."""
    model, gn, x, y = wrapped(flow)
    L1 = per_task_mse(model(x[:32]), y[:32])
    L2 = per_task_mse(model(x[32:]), y[32:])
    expected = naive_norms(L1, list(model.last_shared_layer.parameters()))
    if call == "step":
        loss = (gn.w_i * L1).sum()
        gn.step(L1)
        loss.backward()
    else:
        gn(L1).backward()
    assert gn.aux is not None and not bool(gn.skipped)
    assert_close_to(gn.aux.grad_norms, expected, rtol=1e-5, atol=0)
    other = naive_norms(L2, list(model.last_shared_layer.parameters()))
    assert not torch.allclose(torch.tensor(expected), torch.tensor(other))  # the batches differ


def test_a_head_called_twice_with_heads_raises():
    """With ``heads=``, a head that reads z twice in one forward raises, naming the head and
    the fix (``gn.fork``)."""
    model, gn, x, _ = wrapped("gn(L_i) heads=")
    z = model.shared(x)
    model.heads[0](z)
    with pytest.raises(RuntimeError, match=r"head 0 was called twice .* z_t = gradnorm\.fork\(z\)"):
        model.heads[0](z)


LOSS_SHAPES = {
    "scaled by 1024": lambda gn, L: 1024 * gn(L),
    "extra term through a head": lambda gn, L: gn(L) + 5 * L[0],
    "negative coefficient": lambda gn, L: gn(L) - 2 * L[0],
    "scaled and shifted per task": lambda gn, L: 0.5 * gn(L) + (torch.tensor([3.0, 0.0, 1e-3]) * L).sum(),
}


@pytest.mark.parametrize("shape", list(LOSS_SHAPES))
@pytest.mark.parametrize("flow", FORWARD_FLOWS)
def test_forward_flow_is_exact_under_loss_scaling_and_extra_terms(flow, shape):
    """``gn(L_i)`` reads the coefficient that reached each L_i in the backward, so a scaled
    loss or extra terms through the heads give the norms of grad_W L_i and the oracle's weights."""
    model, gn, x, y = wrapped(flow)
    oracle = NaiveGradNorm(3, alpha=1.5, lr=0.1, optimizer="adam")
    shared = list(model.last_shared_layer.parameters())
    for k in range(3):
        L = per_task_mse(model(x[8 * k:8 * k + 32]), y[8 * k:8 * k + 32])
        norms = naive_norms(L, shared)
        expected = oracle.step(L.tolist(), norms)
        LOSS_SHAPES[shape](gn, L).backward()
        assert gn.aux is not None
        assert_close_to(gn.aux.grad_norms, norms, rtol=1e-5, atol=0)
        assert_close_to(gn.w_i, expected, rtol=1e-5, atol=1e-7)


@needs_cpu_grad_scaler
@pytest.mark.parametrize("flow", FORWARD_FLOWS)
def test_forward_flow_is_exact_under_a_grad_scaler(flow):
    """A GradScaler's scale reaches L_i through the backward; the norms are those of the
    unscaled losses."""
    model, gn, x, y = wrapped(flow)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    L = per_task_mse(model(x), y)
    norms = naive_norms(L, list(model.last_shared_layer.parameters()))
    scaler.scale(gn(L)).backward()
    assert gn.aux is not None
    assert_close_to(gn.aux.grad_norms, norms, rtol=1e-5, atol=0)


@pytest.mark.parametrize("flow", FORWARD_FLOWS)
def test_a_task_whose_coefficient_is_zero(flow):
    """``gn(L_i) - w_0 L_0`` leaves task 0 no cotangent at the fork: without a fork the norms come
    from L_i directly and the update applies; with a fork task 0's norm cannot be recovered and
    the update is skipped, naming task 0."""
    model, gn, x, y = wrapped(flow)
    L = per_task_mse(model(x), y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (gn(L) - (gn.w_i * L)[0]).backward()
    messages = skip_messages(caught)
    if flow == "gn(L_i)":
        assert not bool(gn.skipped) and messages == []
    else:
        assert bool(gn.skipped) and len(messages) == 1
        assert re.search(NORM.format(r"\[0\]"), messages[0]), messages[0]


@pytest.mark.parametrize("flow", FORWARD_FLOWS)
def test_fast_flow_norms_stay_exact_when_a_weight_reaches_the_edge_of_float32(flow):
    """An SGD step with a huge lr would drive a weight below float32's smallest normal number
    after renormalising: that update is skipped (with a warning), so the forward flows, which
    divide the cotangents by w_i, keep seeing the exact norms of grad_W L_i."""
    model, gn, x, y = wrapped(flow, optimizer="sgd", lr=1e10, min_weight=1e-30)
    shared = list(model.last_shared_layer.parameters())
    for k in range(3):
        L = per_task_mse(model(x[8 * k:8 * k + 32]), y[8 * k:8 * k + 32])
        norms = naive_norms(L, shared)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gn(L).backward()
        assert all("positive normal numbers" in str(w.message) for w in caught)
        assert bool(gn.skipped) or bool((gn.w_i >= torch.finfo(torch.float32).tiny).all())
        assert gn.aux is not None
        assert_valid_weights(gn.w_i, 3.0)
        assert_close_to(gn.aux.grad_norms, norms, rtol=1e-5,
                        msg=lambda m: f"step {k}, weights {gn.w_i.tolist()}: {m}")


WRAPPER_FLOWS_WITHOUT_FORK = ["gn(L_i)", "gn.step before backward", "seed flow"]


def run_wrapper_flow(flow: str, gn: gf.GradNorm, L: Tensor) -> None:
    if flow == "gn(L_i)":
        gn(L).backward()
    elif flow == "gn.step before backward":
        loss = (gn.w_i * L).sum()
        gn.step(L)
        loss.backward()
    else:
        (gn.w_i * L).sum().backward(retain_graph=True)
        gn.apply_grads(gn.gradnorm(L))


@pytest.mark.parametrize("api", ["step", "gradnorm_loss+update", *WRAPPER_FLOWS_WITHOUT_FORK])
def test_a_layer_that_not_every_task_shares(api):
    """W = one task's head: the other tasks' norms are 0, so the update is skipped with a
    warning naming them, in both APIs (never a quiet raise of their weights)."""
    model, x, y = toy(separate_heads=True)
    head = model.heads[0]
    match = (NORM.format(r"\[1, 2\]")
             + r" \(\[0\.0, 0\.0\]\); a zero norm means W is not shared by task\(s\) \[1, 2\]")
    if api in FUNCTIONAL:
        params = {k: v.detach() for k, v in head.named_parameters()}

        def losses_fn(p):
            named = {f"heads.0.{k}": v for k, v in p.items()}
            return per_task_mse(functional_call(model, named, (x,)), y)

        state = gf.init_state(3)
        with pytest.warns(gf.SkippedUpdateWarning, match=match):
            if api == "step":
                state, _ = gf.step(state, params, losses_fn)
            else:
                grads, aux = torch.func.grad(
                    lambda w: gf.gradnorm_loss(state._replace(weights=w), params, losses_fn),
                    has_aux=True)(state.weights)
                state = gf.update(state, grads, aux=aux)
    else:
        gn = gf.GradNorm(head, 1.5, 3)
        with pytest.warns(gf.SkippedUpdateWarning, match=match):
            run_wrapper_flow(api, gn, per_task_mse(model(x), y))
        state = gn.state
    assert bool(state.skipped) and int(state.update_count) == 0
    torch.testing.assert_close(state.weights, torch.ones(3))


@pytest.mark.parametrize("flow", WRAPPER)
def test_an_unused_shared_parameter_is_named(flow):
    """A tensor in W that no loss uses raises, naming it, in every wrapper flow."""
    model, gn0, x, y = wrapped(flow)
    unrelated = nn.Linear(2, 2)
    heads = {"heads": model.heads} if flow == "gn(L_i) heads=" else {}
    gn = gf.GradNorm([model.last_shared_layer.weight, unrelated.weight], 1.5, 3, **heads)
    if flow == "gn(L_i) fork":
        model.fork = gn.fork
    with pytest.raises(ValueError, match=r"do(es)? not depend on shared parameter\(s\) \['layer\[1\]'\]"):
        run_wrapper_flow(flow if flow in WRAPPER_FLOWS_WITHOUT_FORK else "gn(L_i)", gn,
                         per_task_mse(model(x), y))
    assert int(gn.update_count) == 0


@pytest.mark.parametrize("api", ["step", *WRAPPER_FLOWS_WITHOUT_FORK])
def test_a_partly_frozen_layer_norms_its_trainable_part(api):
    """With the layer's weight frozen, W is its bias alone (the wrapper's default: every
    trainable parameter); the norms are those of grad_bias L_i, and the weights the oracle's."""
    model, x, y = toy()
    layer = model.last_shared_layer
    layer.weight.requires_grad_(False)
    L = per_task_mse(model(x), y)
    norms = naive_norms(L, [layer.bias])
    expected = NaiveGradNorm(3, alpha=1.5, lr=0.1, optimizer="adam").step(L.tolist(), norms)
    if api == "step":
        def losses_fn(p):
            return per_task_mse(functional_call(model, {"last_shared_layer.bias": p["bias"]}, (x,)), y)

        state, aux = gf.step(gf.init_state(3, lr=0.1), {"bias": layer.bias.detach()}, losses_fn)
    else:
        gn = gf.GradNorm(layer, 1.5, 3, lr=0.1)
        run_wrapper_flow(api, gn, L)
        state, aux = gn.state, gn.aux
    assert_close_to(aux.grad_norms, norms, rtol=1e-5, atol=0)
    assert_close_to(state.weights, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("flow", ["gn(L_i)", "gn(L_i) fork", "gn.step before backward"])
def test_a_nan_micro_batch_skips_its_accumulation_window(flow):
    """Under accumulation a NaN in any micro-batch makes the window's mean NaN: that window's
    update is skipped (one skip, one warning) and the next window applies."""
    model, gn, x, y = wrapped("gn(L_i) fork" if flow == "gn(L_i) fork" else "gn(L_i)",
                              accumulation_steps=2)
    flow = "gn(L_i)" if flow == "gn(L_i) fork" else flow
    poison = torch.tensor([1.0, math.nan, 1.0])
    for k, scale in enumerate([None, poison]):
        L = per_task_mse(model(x[16 * k:16 * k + 16]), y[16 * k:16 * k + 16])
        if scale is None:
            run_wrapper_flow(flow, gn, L)
        else:
            with pytest.warns(gf.SkippedUpdateWarning, match=LOSS.format(r"\[1\]", r"\[nan\]")):
                run_wrapper_flow(flow, gn, L * scale)
    assert (int(gn.update_count), int(gn.skipped_count), bool(gn.skipped)) == (0, 1, True)
    for k in range(2, 4):
        rows = slice(16 * k, 16 * k + 16)
        run_wrapper_flow(flow, gn, per_task_mse(model(x[rows]), y[rows]))
    assert (int(gn.update_count), int(gn.skipped_count), bool(gn.skipped)) == (1, 1, False)


@pytest.mark.parametrize("dtype", [torch.bfloat16,
                                   pytest.param(torch.float16, marks=needs_cpu_half_matmul)])
@pytest.mark.parametrize("api", ["step", *WRAPPER])
def test_a_half_precision_model_keeps_a_float32_state(api, dtype):
    """A model in bfloat16 or float16: the losses and norms are cast to the float32 state, and
    the weights are valid and those of the oracle fed with the same half-precision losses."""
    model, x, y = toy(separate_heads=api == "gn(L_i) heads=", dtype=dtype)
    shared = list(model.last_shared_layer.parameters())
    oracle = NaiveGradNorm(3, alpha=1.5, lr=0.1, optimizer="adam")
    state = gf.init_state(3, lr=0.1)
    gn = None
    if api != "step":
        heads = {"heads": model.heads} if api == "gn(L_i) heads=" else {}
        gn = gf.GradNorm(model.last_shared_layer, 1.5, 3, lr=0.1, **heads)
        if api == "gn(L_i) fork":
            model.fork = gn.fork
    for k in range(2):
        xb, yb = x[8 * k:8 * k + 32], y[8 * k:8 * k + 32]
        L = per_task_mse(model(xb), yb)
        assert L.dtype == dtype
        norms = naive_norms(L, shared)
        expected = oracle.step(L.tolist(), norms)
        if gn is None:
            params = {n: p.detach() for n, p in model.last_shared_layer.named_parameters()}
            state, aux = gf.step(state, params, lambda p: per_task_mse(functional_call(
                model, {f"last_shared_layer.{n}": v for n, v in p.items()}, (xb,)), yb))
        else:
            run_wrapper_flow(api if api in WRAPPER_FLOWS_WITHOUT_FORK else "gn(L_i)", gn, L)
            state, aux = gn.state, gn.aux
        assert state.weights.dtype == torch.float32 and not bool(state.skipped)
        assert_valid_weights(state.weights, 3.0)
        assert_close_to(aux.grad_norms, norms, rtol=2e-2, atol=0)
        assert_close_to(state.weights, expected, rtol=1e-3, atol=1e-5)


def test_casting_the_model_keeps_the_state_in_float32():
    """``model.half()`` or ``.to(torch.bfloat16)`` on a model holding a GradNorm leaves its state
    in float32 (a bfloat16 state would round 1 - beta2 and lose the sum)."""
    model, _, _ = toy()
    model.gradnorm = gf.GradNorm(model.last_shared_layer, 1.5, 3)
    for cast in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.double()):
        cast(model)
        assert all(t.dtype == torch.float32 for t in (model.gradnorm.weights, model.gradnorm.exp_avg,
                                                      model.gradnorm.hyper.beta2))


# ---------------------------------------------------------------------------- compiled == eager
@needs_fullgraph_compile
def test_compiled_step_skips_exactly_when_eager_does():
    """One ``torch.compile(fullgraph=True)`` functional step fed NaN, inf, zero and negative
    losses and zero norms gives eager's state after every step (skipped, skipped_count
    included), and never warns; eager warns."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=gen)
    params = {"weight": torch.randn(3, 4, generator=gen), "bias": torch.zeros(3)}

    def train_step(state, params, scale, shift, zero):
        def losses_fn(p):
            L = (x @ p["weight"].T + p["bias"]).square().mean(0) + 0.1
            return torch.where(zero, L - L.detach(), L * scale + shift)
        return gf.step(state, params, losses_fn)

    compiled = torch.compile(train_step, fullgraph=True)
    ones, zeros, none = torch.ones(3), torch.zeros(3), torch.zeros(3, dtype=torch.bool)
    sequence = [  # (scale, shift, zero) per step
        (torch.tensor([1.0, math.nan, 1.0]), zeros, none),  # NaN at the first step
        (ones, zeros, none),
        (torch.tensor([1.0, 1.0, math.inf]), zeros, none),
        (ones, zeros, torch.tensor([True, False, False])),  # a loss of exactly 0
        (torch.tensor([-1.0, 1.0, 1.0]), zeros, none),  # a negative loss
        (torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 0.0]), none),  # a zero norm
        (torch.tensor([1.0, 2.0, 0.5]), zeros, none),
        (ones, zeros, none),
    ]
    starts = {"adam": gf.init_state(3, lr=0.1),
              "alpha=1e6": gf.init_state(3, alpha=1e6),  # targets overflow after the first step
              "sgd lr=1e30": gf.init_state(3, optimizer="sgd", lr=1e30)}
    compiled(starts["adam"], params, *sequence[1])  # compile once, outside the comparison
    with torch._dynamo.config.patch(error_on_recompile=True):
        for name, start in starts.items():
            eager_state = compiled_state = start
            for k, inputs in enumerate(sequence):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    compiled_state, compiled_aux = compiled(compiled_state, params, *inputs)
                assert not [w for w in caught if issubclass(w.category, gf.SkippedUpdateWarning)]
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    eager_state, _ = train_step(eager_state, params, *inputs)
                warned = [w for w in caught if issubclass(w.category, gf.SkippedUpdateWarning)]
                skips = int(eager_state.skipped_count)
                assert bool(warned) == (bool(eager_state.skipped) and skips & (skips - 1) == 0)
                for key, value in gf.state_to_dict(eager_state).items():
                    got = gf.state_to_dict(compiled_state)[key]
                    torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-7, equal_nan=True,
                                               msg=lambda m: f"{name}, step {k}, {key}: {m}")
            assert int(eager_state.skipped_count) >= 5, name
