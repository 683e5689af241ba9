"""Cost of a GradNorm training step relative to the same step without GradNorm.

Every variant of a model trains its own copy (same initial weights, SGD), and the variants
are timed side by side in one process: one timed step of each per round, the order rotated
from round to round, garbage collection off inside a round; on the toy model each timed
step follows an untimed step of the same variant (warm caches, as in training). A cell is
the median over rounds of time(variant) / time(plain step of the same model) in that
round, with the interquartile range in brackets. On the CPU the clock is
``time.thread_time()`` (CPU time of this thread, one torch thread); on CUDA, CUDA events
between ``torch.cuda.synchronize()`` calls.

The flop limit of a model is 1 + T x MACs(grad_W of one task) / MACs(plain forward and
backward), the plain step's multiply-adds counted exactly by ``FlopCounterMode`` (see
``models.py``): the ratio GradNorm would cost if time were proportional to matmul work.

Run from the repository root:

    python benchmarks/bench_overhead.py [--quick] [--rounds N] [--device cpu|cuda]
        [--only toy|conv|transformer|functional|memory|ops|profile]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import gc
import os
import platform
import pstats
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gradnorm_func as gf  # noqa: E402
import gradnorm_func._capture as gf_capture  # noqa: E402
import gradnorm_func._wrapper as gf_wrapper  # noqa: E402
import models  # noqa: E402
from models import Workload  # noqa: E402

Step = Callable[[], None]
LR = 1e-4  # SGD learning rate of the model (timing runs)
TOY_TARGETS = {2: 1.15, 10: 1.30, 50: 1.50}  # fast flow, eager, batch 100
COMPILED_TARGET = 1.10  # compiled functional step, T = 2 and 10
MEMORY_TARGET = 1.30  # peak memory of a step, ratio to the plain step
LIMIT_SLACK = 0.03  # conv and transformer: ratio <= flop limit + this


# =========================================================================== the flows
@dataclass
class Variant:
    """One timed variant: ``steps`` training steps per call, compared with ``base``."""

    fn: Step
    base: str = "plain"  # the variant whose time is the denominator
    steps: int = 1  # training steps per call (update_every=k: a whole window of k steps)
    gradnorm: Any = None  # the GradNorm module, when there is one (sanity checks)
    model: nn.Module | None = None


def new_gradnorm(model: nn.Module, work: Workload, fast: str | None, **kwargs: Any) -> gf.GradNorm:
    """GradNorm on ``model.last_shared_layer``, with the fast path ``fast``: "heads" (heads=),
    "fork" (the model's forward calls gn.fork(z)) or None (the general path)."""
    heads = model.heads if fast == "heads" else None
    gn = gf.GradNorm(model.last_shared_layer, work.alpha, work.num_tasks, heads=heads, **kwargs)
    if fast == "fork":
        model.fork = gn.fork
    return gn


def sgd(model: nn.Module, lr: float = LR) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr)


def plain_flow(work: Workload, model: nn.Module, lr: float = LR, *, repeat: int = 1) -> Variant:
    """loss = sum_i w_i L_i with constant weights; backward; SGD step (``repeat`` times a
    call, the base of ``update_every=repeat``)."""
    opt = sgd(model, lr)
    weights = torch.ones(work.num_tasks, device=next(model.parameters()).device)

    def step() -> None:
        for _ in range(repeat):
            (weights * work.losses(model(work.inputs))).sum().backward()
            opt.step()
            opt.zero_grad()

    return Variant(step, steps=repeat, model=model)


def one_line_flow(work: Workload, model: nn.Module, fast: str | None, *, update_every: int = 1,
                  lr: float = LR, base: str = "plain") -> Variant:
    """``loss = gn(L_i); loss.backward(); opt.step()``; a call runs one window of
    ``update_every`` steps (the first updates the weights, the others do not)."""
    opt = sgd(model, lr)
    gn = new_gradnorm(model, work, fast, update_every=update_every)

    def step() -> None:
        for _ in range(update_every):
            gn(work.losses(model(work.inputs))).backward()
            opt.step()
            opt.zero_grad()

    return Variant(step, base=base, steps=update_every, gradnorm=gn, model=model)


def step_first_flow(work: Workload, model: nn.Module, fast: str | None, *, lr: float = LR,
                    base: str = "plain") -> Variant:
    """``loss = (gn.w_i * L_i).sum(); gn.step(L_i); loss.backward(); opt.step()``."""
    opt = sgd(model, lr)
    gn = new_gradnorm(model, work, fast)

    def step() -> None:
        task_losses = work.losses(model(work.inputs))
        loss = (gn.w_i * task_losses).sum()
        gn.step(task_losses)
        loss.backward()
        opt.step()
        opt.zero_grad()

    return Variant(step, base=base, gradnorm=gn, model=model)


def seed_flow(work: Workload, model: nn.Module, *, lr: float = LR, base: str = "plain") -> Variant:
    """The seed library's flow, no fork: ``loss.backward(retain_graph=True)``, then
    ``gn.apply_grads(gn.gradnorm(L_i))``."""
    opt = sgd(model, lr)
    gn = new_gradnorm(model, work, None)

    def step() -> None:
        task_losses = work.losses(model(work.inputs))
        (gn.w_i * task_losses).sum().backward(retain_graph=True)
        gn.apply_grads(gn.gradnorm(task_losses))
        opt.step()
        opt.zero_grad()

    return Variant(step, base=base, gradnorm=gn, model=model)


def naive_flow(work: Workload, model: nn.Module, *, lr: float = LR, base: str = "plain") -> Variant:
    """What typical implementations do: one ``torch.autograd.grad(L_i, W)`` per task, the
    norms, then the library's update (``gf.step_from_norms``), then the model's backward."""
    opt = sgd(model, lr)
    shared = list(model.last_shared_layer.parameters())
    device = shared[0].device
    state = gf.init_state(work.num_tasks, alpha=work.alpha, device=device)

    def step() -> None:
        nonlocal state
        task_losses = work.losses(model(work.inputs))
        loss = (state.weights * task_losses).sum()
        norms = torch.stack([
            torch.linalg.vector_norm(torch.cat([g.flatten() for g in torch.autograd.grad(
                task_losses[i], shared, retain_graph=True)]))
            for i in range(work.num_tasks)])
        state, _ = gf.step_from_norms(state, task_losses.detach(), norms)
        loss.backward()
        opt.step()
        opt.zero_grad()

    return Variant(step, base=base, model=model)


def variants(work: Workload, fast: str, *, every: Iterable[int] = (4, 16), seed: bool = True,
             naive: bool = True, base: str = "plain", prefix: str = "") -> dict[str, Variant]:
    """Every flow of one model (each on its own copy): plain, the one-line fast flow,
    step-before-backward, the general path, the seed flow, the naive loop, update_every=k."""
    out = {f"{prefix}plain": plain_flow(work, work.make()),
           f"{prefix}fast": one_line_flow(work, work.make(), fast, base=base),
           f"{prefix}step-first": step_first_flow(work, work.make(), fast, base=base),
           f"{prefix}general": one_line_flow(work, work.make(), None, base=base)}
    if seed:
        out[f"{prefix}seed"] = seed_flow(work, work.make(), base=base)
    if naive:
        out[f"{prefix}naive"] = naive_flow(work, work.make(), base=base)
    for k in every:  # against k plain steps in a row: both run k steps of one model in a row
        out[f"{prefix}plain x{k}"] = plain_flow(work, work.make(), repeat=k)
        out[f"{prefix}every {k}"] = one_line_flow(work, work.make(), fast, update_every=k,
                                                  base=f"{prefix}plain x{k}")
    return out


# =========================================================================== sanity check
def check_fast_equals_general(work: Workload, fast: str, steps: int = 3) -> str:
    """The fast flows (one-line and step-first) and the general path, from one start, give
    the same task weights, norms and model after a few steps (so the timings compare equal
    work). Raises AssertionError otherwise."""
    runs = {"fast": one_line_flow(work, work.make(), fast, lr=1e-3),
            "step-first": step_first_flow(work, work.make(), fast, lr=1e-3),
            "general": one_line_flow(work, work.make(), None, lr=1e-3)}
    for _ in range(steps):
        for run in runs.values():
            run.fn()
    ref = runs["general"]
    worst = 0.0
    # CUDA convolutions may run in TF32 (cuDNN's default), which the two paths round apart.
    rtol = 1e-2 if ref.gradnorm.w_i.device.type == "cuda" else 1e-4
    for name in ("fast", "step-first"):
        run = runs[name]
        pairs = [(run.gradnorm.w_i, ref.gradnorm.w_i),
                 (run.gradnorm.aux.grad_norms, ref.gradnorm.aux.grad_norms),
                 *zip(run.model.parameters(), ref.model.parameters())]
        for a, b in pairs:
            torch.testing.assert_close(a, b, rtol=rtol, atol=rtol / 10,
                                       msg=lambda m: f"{work.name}: {name} differs from general: {m}")
            worst = max(worst, float(((a - b).abs() / b.abs().clamp_min(1e-6)).max().detach()))
    return f"{work.name}: fast ({fast}) and step-first equal the general path after {steps} steps " \
           f"(weights, norms, model; max relative difference {worst:.1e})"


# =========================================================================== timing
class Clock:
    """Seconds of one call: this thread's CPU time, or CUDA events around synchronisations."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Step) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = time.thread_time()
        fn()
        return time.thread_time() - begin


def interleaved(table: dict[str, Variant], rounds: int, clock: Clock, *, warmup: int = 2,
                budget: float = 0.0, warm: bool = False) -> dict[str, list[float]]:
    """Seconds per training step of each variant in each round (one call of each per round,
    the order rotated each round, no garbage collection inside a round, one untimed call
    before the first).

    With a ``budget`` (seconds of wall time), as many rounds as fit in it, at least 7 and
    at most 5 x ``rounds``: cheap rows get more rounds, to tame the noise of a shared machine.
    """
    for _ in range(warmup):
        begin = time.perf_counter()
        for variant in table.values():
            variant.fn()
        round_s = time.perf_counter() - begin
    if budget:
        rounds = max(7, min(5 * rounds, int(budget / max(round_s, 1e-9))))
    names = list(table)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        gc.collect()
        gc.disable()
        try:
            # The collection leaves the caches cold: an untimed call of the round's last
            # variant, so that the first timed call follows another step like all the others.
            table[order[-1]].fn()
            for name in order:
                if warm:  # the timed call follows a step of the same model, as in training
                    table[name].fn()
                times[name].append(clock(table[name].fn) / table[name].steps)
        finally:
            gc.enable()
    return times


@dataclass
class Ratio:
    median: float
    q1: float
    q3: float

    def __str__(self) -> str:
        return f"{self.median:.2f} [{self.q1:.2f}-{self.q3:.2f}]"


def ratio(times: dict[str, list[float]], name: str, base: str) -> Ratio:
    """Median and quartiles over rounds of time(name) / time(base) in the same round."""
    per_round = sorted(a / b for a, b in zip(times[name], times[base]))
    if len(per_round) < 2:
        return Ratio(per_round[0], per_round[0], per_round[0])
    q1, q2, q3 = statistics.quantiles(per_round, n=4, method="inclusive")
    return Ratio(q2, q1, q3)


def ms(times: dict[str, list[float]], name: str) -> str:
    return f"{statistics.median(times[name]) * 1e3:.2f}"


def markdown(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()


def yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


# =========================================================================== sections
@dataclass
class Summary:
    """What each section found, for the closing list of targets."""

    targets: list[tuple[str, str, bool]] = field(default_factory=list)  # (what, value, met)

    def add(self, what: str, value: str, met: bool) -> None:
        self.targets.append((what, value, met))


def toy_section(args: argparse.Namespace, device: torch.device, clock: Clock, summary: Summary) -> None:
    print("## Paper toy model, eager (wrapper flows)\n")
    print("Stacked heads (one einsum) with `gn.fork(z)` in the forward, and separate `nn.Linear` "
          "heads with `heads=model.heads`; each against the plain step of the same model. "
          "`fast` = one-line flow `gn(L_i).backward()`; `step-first` = `gn.step(L_i)` before "
          "`loss.backward()`; `general` = one-line flow without a fork; `seed` = "
          "`backward(retain_graph=True)` then `apply_grads(gradnorm(L_i))`, no fork; `naive` = "
          "one `autograd.grad(L_i, W)` per task; `every k` = `update_every=k`, the mean over a "
          "window of k steps. Cells: median ratio to the plain step [interquartile range].\n")
    for work in (models.toy(10, 100, stacked=True), models.toy(10, 100, stacked=False)):
        fast = "fork" if work.stacked else "heads"
        print("- " + check_fast_equals_general(work.to(device), fast))
    print()
    if args.quick:
        rows = [(2, 100), (10, 100)]
    else:
        rows = [(t, 100) for t in (2, 5, 10, 20, 50)] + [(t, b) for b in (25, 400) for t in (2, 10, 50)]
    stacked_rows, separate_rows = [], []
    against_general: dict[str, list[tuple[float, str]]] = {"fork": [], "heads=": []}
    for num_tasks, batch in rows:
        stacked = models.toy(num_tasks, batch, stacked=True).to(device)
        separate = models.toy(num_tasks, batch, stacked=False).to(device)
        limit = models.flop_limit(models.toy(num_tasks, batch, stacked=True)).limit
        table = variants(stacked, "fork", every=() if args.quick and num_tasks > 2 else (4, 16))
        table.update(variants(separate, "heads", every=(), seed=False, naive=False,
                              base="sep plain", prefix="sep "))
        times = interleaved(table, args.rounds, clock, budget=2.0 if args.quick else 8.0, warm=True)
        rounds = str(len(times["plain"]))
        target = TOY_TARGETS.get(num_tasks) if batch == 100 else None

        def cells(prefix: str, names: list[str]) -> list[str]:
            return [str(ratio(times, prefix + n, table[prefix + n].base)) if prefix + n in times
                    else "-" for n in names]

        def verdict(prefix: str) -> tuple[str, str]:
            fast = ratio(times, prefix + "fast", prefix + "plain").median
            general = ratio(times, prefix + "general", prefix + "plain").median
            faster = fast <= general
            met = "-" if target is None else yes(fast <= target)
            kind = "heads=" if prefix else "fork"
            if target is not None:
                summary.add(f"toy T={num_tasks} eager, {kind} one-line <= {target}", f"{fast:.2f}",
                            fast <= target)
            against_general[kind].append((fast / general, f"T={num_tasks} batch={batch}"))
            return met, yes(faster)

        met, faster = verdict("")
        stacked_rows.append([str(num_tasks), str(batch), rounds, ms(times, "plain"),
                             *cells("", ["fast", "step-first", "general", "seed", "naive",
                                         "every 4", "every 16"]),
                             f"{limit:.3f}", "-" if target is None else f"{target:.2f}", met, faster])
        met, faster = verdict("sep ")
        separate_rows.append([str(num_tasks), str(batch), rounds, ms(times, "sep plain"),
                              *cells("sep ", ["fast", "step-first", "general"]),
                              f"{limit:.3f}", "-" if target is None else f"{target:.2f}", met, faster])
    for kind, found in against_general.items():
        worst, where = max(found)
        summary.add(f"toy {kind} one-line <= general, every row", f"max fast/general {worst:.2f} "
                    f"({where})", worst <= 1.0)
    print("### Stacked heads, `gn.fork(z)`\n")
    markdown(["T", "batch", "rounds", "plain ms", "fast", "step-first", "general", "seed", "naive",
              "every 4", "every 16", "flop limit", "target", "met?", "fast <= general?"],
             stacked_rows)
    print("### Separate heads, `heads=model.heads`\n")
    markdown(["T", "batch", "rounds", "plain ms", "fast", "step-first", "general", "flop limit", "target",
              "met?", "fast <= general?"], separate_rows)


def model_section(work: Workload, args: argparse.Namespace, device: torch.device, clock: Clock,
                  summary: Summary) -> None:
    print(f"## {work.name}\n")
    limit = models.flop_limit(work)
    work = work.to(device)
    print("- " + check_fast_equals_general(work, "heads"))
    print(f"- flop limit {limit.limit:.3f} = 1 + {work.num_tasks} x "
          f"{limit.weight_grad_macs / 1e6:.1f} M MACs (grad_W of one task) / "
          f"{limit.plain_macs / 1e9:.2f} G MACs (plain forward and backward)\n")
    every = (4,) if args.quick else (4, 16)
    table = variants(work, "heads", every=every)
    rounds = max(3, args.rounds // 3) if args.quick else max(5, args.rounds // 2)
    times = interleaved(table, rounds, clock, warmup=1)
    names = ["fast", "step-first", "general", "seed", "naive", *[f"every {k}" for k in every]]
    fast = ratio(times, "fast", "plain").median
    general = ratio(times, "general", "plain").median
    target = limit.limit + LIMIT_SLACK
    markdown(["rounds", "plain ms", "fast (heads=)", "step-first", "general", "seed", "naive",
              *[f"every {k}" for k in every], "flop limit", "target", "met?", "fast <= general?"],
             [[str(rounds), ms(times, "plain"), *[str(ratio(times, n, table[n].base)) for n in names],
               f"{limit.limit:.3f}", f"{target:.3f}", yes(fast <= target), yes(fast <= general)]])
    summary.add(f"{work.name.split()[0]} one-line <= flop limit + {LIMIT_SLACK}",
                f"{fast:.3f} vs {target:.3f}", fast <= target)
    summary.add(f"{work.name.split()[0]} one-line <= general", f"{fast:.3f} vs {general:.3f}",
                fast <= general)


# --------------------------------------------------------------------------- functional
def functional_toy(num_tasks: int, batch: int, device: torch.device):
    """A plain and a GradNorm functional SGD step of the stacked-head toy model.

    The GradNorm step differentiates with respect to the parameters and a zero probe
    (``gf.fork``), takes the per-task gradients at W from the probe's cotangents
    (``gf.fork_gradients``) and updates the weights (``gf.step_from_gradients``).
    """
    work = models.toy(num_tasks, batch, stacked=True).to(device)
    model = work.make()
    x, y = work.inputs, work.targets
    params = {"trunk": {k: v.detach() for k, v in model.trunk.named_parameters()},
              "shared": {k: v.detach() for k, v in model.last_shared_layer.named_parameters()},
              "heads": {"weight": model.heads_weight.detach(), "bias": model.heads_bias.detach()}}

    def trunk(p: dict, x: Tensor) -> Tensor:
        return torch.func.functional_call(model.trunk, p, (x,))

    def segment(p: dict, h: Tensor) -> Tensor:
        return torch.relu(F.linear(h, p["weight"], p["bias"]))

    def sgd_update(p: Any, g: Any) -> Any:
        return torch.utils._pytree.tree_map(lambda a, b: a - LR * b, p, g)

    def plain(params: dict, weights: Tensor) -> dict:
        def loss(p: dict) -> Tensor:
            z = segment(p["shared"], trunk(p["trunk"], x))
            out = torch.einsum("bk,tok->bto", z, p["heads"]["weight"]) + p["heads"]["bias"]
            return (weights * models.per_task_mse(out, y)).sum()
        return sgd_update(params, torch.func.grad(loss)(params))

    def gradnorm(params: dict, state: gf.GradNormState, probe: Tensor):
        def loss(p: dict, probe: Tensor):
            h = trunk(p["trunk"], x)
            z_t = gf.fork(segment(p["shared"], h), probe)
            out = torch.einsum("tbk,tok->bto", z_t, p["heads"]["weight"]) + p["heads"]["bias"]
            task_losses = models.per_task_mse(out, y)
            return (state.weights * task_losses).sum(), (task_losses, h)

        (grads, cotangents), (task_losses, h) = torch.func.grad(
            loss, argnums=(0, 1), has_aux=True)(params, probe)
        task_grads = gf.fork_gradients(segment, params["shared"], h, cotangents, state.weights)
        state, _ = gf.step_from_gradients(state, task_losses, task_grads)
        return sgd_update(params, grads), state

    state = gf.init_state(num_tasks, alpha=work.alpha, device=device)
    probe = gf.fork_probe(num_tasks, (batch, 100), device=device)
    weights = torch.ones(num_tasks, device=device)
    return plain, gradnorm, params, state, probe, weights


def functional_section(args: argparse.Namespace, device: torch.device, clock: Clock,
                       summary: Summary) -> None:
    print("## Paper toy model, functional step (stacked heads; `gf.fork`, `gf.fork_gradients`, "
          "`gf.step_from_gradients`)\n")
    print("Both steps compiled with `torch.compile(..., fullgraph=True)`: the compile succeeding "
          "proves the GradNorm step has no graph break and no host sync. Eager rows for "
          "reference.\n")
    rows = []
    for num_tasks in (2, 10):
        plain, gradnorm, params, state, probe, weights = functional_toy(num_tasks, 100, device)
        torch._dynamo.reset()
        begin = time.perf_counter()
        c_plain = torch.compile(plain, fullgraph=True)
        c_gradnorm = torch.compile(gradnorm, fullgraph=True)
        c_plain(params, weights)
        c_gradnorm(params, state, probe)
        compile_s = time.perf_counter() - begin
        # The compiled GradNorm step equals the eager one.
        tolerance = 1e-3 if device.type == "cuda" else 1e-4
        eager_out, compiled_out = gradnorm(params, state, probe), c_gradnorm(params, state, probe)
        torch.utils._pytree.tree_map(
            lambda a, b: torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance / 10),
            eager_out,
            compiled_out)
        table = {"eager plain": Variant(lambda: plain(params, weights), base="eager plain"),
                 "eager gradnorm": Variant(lambda: gradnorm(params, state, probe), base="eager plain"),
                 "compiled plain": Variant(lambda: c_plain(params, weights), base="compiled plain"),
                 "compiled gradnorm": Variant(lambda: c_gradnorm(params, state, probe),
                                              base="compiled plain")}
        times = interleaved(table, args.rounds, clock, warmup=3, budget=3.0 if args.quick else 10.0,
                            warm=True)
        eager = ratio(times, "eager gradnorm", "eager plain")
        compiled = ratio(times, "compiled gradnorm", "compiled plain")
        limit = models.flop_limit(models.toy(num_tasks, 100, stacked=True)).limit
        rows.append([str(num_tasks), str(len(times["eager plain"])), ms(times, "eager plain"), str(eager), ms(times, "compiled plain"),
                     str(compiled), f"{limit:.3f}", f"{COMPILED_TARGET:.2f}",
                     yes(compiled.median <= COMPILED_TARGET), "yes", f"{compile_s:.0f}"])
        summary.add(f"toy T={num_tasks} compiled functional <= {COMPILED_TARGET}", f"{compiled.median:.2f}",
                    compiled.median <= COMPILED_TARGET)
    markdown(["T", "rounds", "eager plain ms", "eager gradnorm", "compiled plain ms", "compiled gradnorm",
              "flop limit", "target", "met?", "fullgraph", "compile s (both)"], rows)


# --------------------------------------------------------------------------- memory
def peak_bytes(fn: Step, device: torch.device) -> int:
    """Peak memory of one call above what was allocated before it.

    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: the peak of the
    running sum of the allocations and frees that ``torch.profiler(profile_memory=True)``
    records during the call.
    """
    fn()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def memory_section(args: argparse.Namespace, device: torch.device, summary: Summary) -> None:
    print("## Peak memory of one step, above what lives before it\n")
    how = ("`torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`" if device.type == "cuda"
           else "the peak of the running sum of the CPU allocator's allocations and frees recorded "
                "by `torch.profiler(profile_memory=True)`")
    print(f"Measured as {how}; parameters (and gradients, freed by `zero_grad` at the end of "
          "each step) are outside. Ratio to the plain step of the same model; target <= "
          f"{MEMORY_TARGET}x for every wrapper flow (`naive` is not one; for reference).\n")
    works = [(models.toy(10, 100, stacked=True), "fork"), (models.toy(10, 100, stacked=False), "heads"),
             (models.conv(), "heads"), (models.transformer(), "heads")]
    if not args.quick:
        works.insert(0, (models.toy(2, 100, stacked=True), "fork"))
        works.insert(2, (models.toy(50, 100, stacked=True), "fork"))
    rows = []
    names = ["fast", "step-first", "general", "seed", "naive"]
    for work, fast in works:
        work = work.to(device)
        table = variants(work, fast, every=())
        peaks = {name: peak_bytes(v.fn, device) for name, v in table.items()}
        label = f"{work.name} ({'fork' if fast == 'fork' else 'heads='})"
        rows.append([label, f"{peaks['plain'] / 2 ** 20:.2f}",
                     *[f"{peaks[n] / peaks['plain']:.2f}" for n in names]])
        for n in names[:4]:
            r = peaks[n] / peaks["plain"]
            summary.add(f"memory {label.split(' batch')[0]} {'heads=' if fast == 'heads' else fast} "
                        f"{n} <= {MEMORY_TARGET}", f"{r:.2f}", r <= MEMORY_TARGET)
        del table
    markdown(["model", "plain MiB", "fast", "step-first", "general", "seed", "naive"], rows)


# --------------------------------------------------------------------------- op counts
class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched (forward and backward alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Step) -> collections.Counter[str]:
    fn()
    with OpCounter() as counter:
        fn()
    return counter.counts


def diff(a: collections.Counter[str], b: collections.Counter[str]) -> str:
    """a - b as 'op xN' sorted by count, including negative counts."""
    keys = set(a) | set(b)
    delta = {k: a[k] - b[k] for k in keys if a[k] != b[k]}
    return ", ".join(f"{k} {'+' if v > 0 else ''}{v}" for k, v in
                     sorted(delta.items(), key=lambda kv: (-abs(kv[1]), kv[0])))


def ops_section(args: argparse.Namespace, device: torch.device) -> None:
    print("## Aten ops per GradNorm step\n")
    print("Counted with a `TorchDispatchMode` (every aten op, forward and backward), the second "
          "of two calls.\n")
    rows = []
    for num_tasks in (2, 10):
        for optimizer in ("adam", "sgd"):
            state = gf.init_state(num_tasks, alpha=0.12, optimizer=optimizer, device=device)
            losses = torch.rand(num_tasks, device=device) + 0.5
            norms = torch.rand(num_tasks, device=device) + 0.5
            counts = count_ops(lambda: gf.step_from_norms(state, losses, norms))
            rows.append([str(num_tasks), optimizer, str(sum(counts.values())),
                         ", ".join(f"{k} {v}" for k, v in counts.most_common())])
    print("### (a) The weight update alone: `gf.step_from_norms(state, L_i, norms)`\n")
    markdown(["T", "optimizer", "ops", "which"], rows)
    rows = []
    for num_tasks in (2, 10):
        stacked = models.toy(num_tasks, 100, stacked=True).to(device)
        separate = models.toy(num_tasks, 100, stacked=False).to(device)
        base_stacked = count_ops(plain_flow(stacked, stacked.make()).fn)
        base_separate = count_ops(plain_flow(separate, separate.make()).fn)
        for label, variant, base in (
                ("one-line, fork", one_line_flow(stacked, stacked.make(), "fork"), base_stacked),
                ("step-first, fork", step_first_flow(stacked, stacked.make(), "fork"), base_stacked),
                ("one-line, heads=", one_line_flow(separate, separate.make(), "heads"), base_separate),
                ("one-line, general", one_line_flow(stacked, stacked.make(), None), base_stacked)):
            counts = count_ops(variant.fn)
            rows.append([str(num_tasks), label, str(sum(base.values())), str(sum(counts.values())),
                         str(sum(counts.values()) - sum(base.values())), diff(counts, base)])
    print("### (b) A whole wrapper step minus a plain step (toy, batch 100)\n")
    markdown(["T", "flow", "plain ops", "step ops", "added", "added ops by name"], rows)
    if not args.quick:
        compiled_kernels(device)


def compiled_kernels(device: torch.device) -> None:
    """Kernels Inductor generates for the compiled weight update."""
    from torch._inductor import metrics
    rows = []
    for optimizer in ("adam", "sgd"):
        state = gf.init_state(10, alpha=0.12, optimizer=optimizer, device=device)
        losses = torch.rand(10, device=device) + 0.5
        norms = torch.rand(10, device=device) + 0.5
        torch._dynamo.reset()
        metrics.reset()
        torch.compile(gf.step_from_norms, fullgraph=True)(state, losses, norms)
        rows.append([optimizer, str(metrics.generated_kernel_count)])
    print("### (c) Compiled: kernels Inductor generates for `gf.step_from_norms` (T=10)\n")
    markdown(["optimizer", "kernels"], rows)


# --------------------------------------------------------------------------- profile
def thread_seconds(fn: Step, calls: int, repeats: int = 9) -> float:
    """Median over ``repeats`` of this thread's CPU time per call, over ``calls`` calls."""
    fn()
    samples = []
    for _ in range(repeats):
        gc.collect()
        gc.disable()
        begin = time.thread_time()
        for _ in range(calls):
            fn()
        samples.append((time.thread_time() - begin) / calls)
        gc.enable()
    return statistics.median(samples)


def closed_form_work(num_tasks: int, batch: int, width: int = 100) -> Step:
    """The per-task gradients and norms the flop limit counts, written directly: grad_W and
    grad_b of a Linear(width, width) + ReLU for T stacked cotangents, then the T norms."""
    gen = torch.Generator().manual_seed(0)
    cotangents = torch.randn(num_tasks, batch, width, generator=gen)
    mask = torch.rand(batch, width, generator=gen) > 0.5
    h = torch.randn(batch, width, generator=gen)

    def work() -> None:
        c = cotangents * mask
        weight = torch.bmm(c.transpose(1, 2), h.expand(num_tasks, batch, width))
        bias = c.sum(1)
        torch.sqrt(weight.square().sum((1, 2)) + bias.square().sum(1))

    return work


def robust_self_times(prof: Any, calls: int) -> dict[str, tuple[float, float]]:
    """Per op name: (median self time x calls per step, calls per step), in us. The median
    keeps a preempted call (the profiler's clock is wall time) from counting."""
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for event in prof.events():
        by_name[event.name].append(event.self_cpu_time_total)
    return {name: (statistics.median(v) * len(v) / calls, len(v) / calls) for name, v in by_name.items()}


def lean_flow(work: Workload, model: nn.Module, lr: float = LR) -> Variant:
    """A hand-written minimal exact GradNorm step for the stacked toy model (reference only):
    one hook on z_t = z.expand(T, ...) takes the T cotangents during the plain backward,
    then one bmm, the norms and Adam on the T weights, in ~25 ops, with no checks. Same
    maths and defaults as the library (Adam lr 0.025, betas 0.9/0.999, eps 1e-8, min weight
    1e-3, sum T, L_i(0) from the first step)."""
    num_tasks, opt = work.num_tasks, sgd(model, lr)
    seen: dict[str, Tensor] = {}
    model.last_shared_layer.register_forward_hook(
        lambda _m, args, _out: seen.__setitem__("h", args[0].detach()))

    def fork(z: Tensor) -> Tensor:
        z_t = z.expand(num_tasks, *z.shape)
        z_t.register_hook(lambda grad: seen.__setitem__("c", grad))
        seen["z"] = z
        return z_t

    model.fork = fork
    state: dict[str, Any] = {"w": torch.ones(num_tasks), "initial": None, "t": 0,
                             "m": torch.zeros(num_tasks), "v": torch.zeros(num_tasks)}

    def step() -> None:
        task_losses = work.losses(model(work.inputs))
        weights = state["w"]
        (weights * task_losses).sum().backward()
        with torch.no_grad():
            c = seen["c"] * (seen["z"] > 0)  # cotangents at W's output: c_i * relu'(y)
            h = seen["h"]
            grad_w = torch.bmm(c.transpose(1, 2), h.expand(num_tasks, *h.shape))
            norms = (grad_w.square().sum((1, 2)) + c.sum(1).square().sum(1)).sqrt() / weights
            losses = task_losses.detach()
            if state["initial"] is None:
                state["initial"] = losses
            ratios = losses / state["initial"]
            ratios = ratios / ratios.mean()
            weighted = weights * norms
            grads = (weighted - weighted.mean() * ratios.pow(work.alpha)).sign() * norms
            state["t"] += 1
            t = state["t"]
            state["m"].lerp_(grads, 0.1)
            state["v"].lerp_(grads * grads, 0.001)
            new = (weights - 0.025 * (state["m"] / (1 - 0.9 ** t))
                   / ((state["v"] / (1 - 0.999 ** t)).sqrt() + 1e-8)).clamp_(min=1e-3)
            state["w"] = new * (num_tasks / new.sum())
        opt.step()
        opt.zero_grad()

    return Variant(step, model=model, gradnorm=state)


def expand_only_flow(work: Workload, model: nn.Module) -> Variant:
    """The plain step of the stacked toy model whose forward forks z (z.expand, no GradNorm):
    what the fork itself costs the forward and backward."""
    model.fork = lambda z: z.expand(work.num_tasks, *z.shape)
    return plain_flow(work, model)


PHASES = [  # (phase, owner, attribute): the library's functions timed where they run
    ("gn(L_i)", gf_wrapper.GradNorm, "forward"),
    ("records", gf_capture.TaskFork, "_on_layer"),
    ("records", gf_capture.TaskFork, "expand"),
    ("hook on z_t", gf_capture.TaskFork, "_on_stacked"),
    ("closed form", gf_capture.TaskFork, "_stacked_gradients"),
    ("after backward", gf_wrapper.GradNorm, "_after_backward"),
    ("norms", gf_wrapper, "gradient_norms"),
    ("update", gf_wrapper, "step_from_norms"),
]


@contextlib.contextmanager
def timed_phases() -> Iterator[dict[str, float]]:
    """Wraps each function of ``PHASES`` so that this thread's CPU time inside it adds to its
    phase (seconds); restores the functions on exit."""
    spent = {phase: 0.0 for phase, _, _ in PHASES}
    originals = [(owner, name, getattr(owner, name)) for _, owner, name in PHASES]

    def timed(phase: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            begin = time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                spent[phase] += time.thread_time() - begin
        return call

    for (phase, _, _), (owner, name, original) in zip(PHASES, originals):
        setattr(owner, name, timed(phase, original))
    try:
        yield spent
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def phase_row(num_tasks: int, steps: int) -> list[str]:
    """Thread time of each phase of the one-line ``gn.fork`` flow, in us per step, with the
    plain and the lean step alternating with it (toy, batch 100)."""
    work = models.toy(num_tasks, 100, stacked=True)
    table = {"plain": plain_flow(work, work.make()), "fast": one_line_flow(work, work.make(), "fork"),
             "lean": lean_flow(work, work.make())}
    total = dict.fromkeys(table, 0.0)
    with timed_phases() as spent:
        for warm in (True, False):
            gc.collect()
            gc.disable()
            for _ in range(steps // 4 if warm else steps):
                for name, variant in table.items():
                    begin = time.thread_time()
                    variant.fn()
                    if not warm:
                        total[name] += time.thread_time() - begin
            gc.enable()
            if warm:
                spent.update(dict.fromkeys(spent, 0.0))
    us = {name: 1e6 * t / steps for name, t in {**total, **spent}.items()}
    added = us["fast"] - us["plain"]
    after = us["after backward"] - us["norms"] - us["update"]
    hook = us["hook on z_t"] - us["closed form"]
    rest = added - us["gn(L_i)"] - us["records"] - us["hook on z_t"] - us["after backward"]
    return [str(num_tasks), f"{us['plain']:.0f}", f"{added:.0f}", f"{us['lean'] - us['plain']:.0f}",
            f"{us['closed form']:.0f}", f"{rest:.0f}", f"{us['gn(L_i)']:.0f}", f"{us['records']:.0f}",
            f"{hook:.0f}", f"{us['norms']:.0f}", f"{us['update']:.0f}", f"{after:.0f}"]


def profile_section(args: argparse.Namespace, device: torch.device, clock: Clock) -> None:
    """Where the added time of the one-line fast flow goes, toy batch 100."""
    from torch.profiler import ProfilerActivity, profile
    if device.type != "cpu":
        print("## Profile\n\nCPU only (thread time); skipped on CUDA.\n")
        return
    print("## Profile: toy model, batch 100, one-line fast flow (`gn.fork`)\n")
    print("Ratios: interleaved as above. `fork alone` = the plain step of the model whose "
          "forward forks z with `z.expand(T, ...)`, without GradNorm. `lean` = a hand-written "
          "minimal exact step (`lean_flow`: one hook on z_t, one bmm, the norms and Adam on the "
          "T weights, no checks), which gives the library's weights to float rounding. Times in "
          "us: `update` = `gf.step_from_norms` alone; `closed form` = the flop limit's work "
          "written directly (T weight gradients of W as one bmm, bias sums, the ReLU mask, the "
          "T norms); both by thread time over batches of calls, median of 9. `rest` = added - "
          "update - closed form: the wrapper's hooks, records, checks, views, the fork's "
          "expand and its backward, and the division of the norms by the loss coefficients.\n")
    calls = 20 if args.quick else 100
    rows, top_rows = [], []
    for num_tasks in (2, 10) if args.quick else (2, 10, 50):
        work = models.toy(num_tasks, 100, stacked=True)
        check = {"library": one_line_flow(work, work.make(), "fork", lr=1e-3),
                 "lean": lean_flow(work, work.make(), lr=1e-3)}
        for _ in range(3):
            for v in check.values():
                v.fn()
        torch.testing.assert_close(check["lean"].gradnorm["w"], check["library"].gradnorm.w_i,
                                   rtol=1e-4, atol=1e-5)
        plain, flow = plain_flow(work, work.make()), one_line_flow(work, work.make(), "fork")
        table = {"plain": plain, "fast": flow, "fork alone": expand_only_flow(work, work.make()),
                 "lean": lean_flow(work, work.make())}
        times = interleaved(table, args.rounds, clock, budget=1.0 if args.quick else 6.0, warm=True)
        plain_s, fast_s = (statistics.median(times[n]) for n in ("plain", "fast"))
        state = gf.init_state(num_tasks, alpha=0.12)
        losses, norms = torch.rand(num_tasks) + 0.5, torch.rand(num_tasks) + 0.5
        update_s = thread_seconds(lambda: gf.step_from_norms(state, losses, norms), 5 * calls)
        closed_s = thread_seconds(closed_form_work(num_tasks, 100), 5 * calls)
        added = fast_s - plain_s
        op_counts = {name: sum(count_ops(table[name].fn).values())
                     for name in ("plain", "fast", "lean")}
        limit = models.flop_limit(work).limit
        rows.append([str(num_tasks), str(len(times["plain"])), str(ratio(times, "fast", "plain")),
                     str(ratio(times, "fork alone", "plain")), str(ratio(times, "lean", "plain")),
                     f"{limit:.3f}", f"{plain_s * 1e6:.0f}", f"{added * 1e6:.0f}",
                     f"{update_s * 1e6:.0f}", f"{closed_s * 1e6:.0f}",
                     f"{1 + closed_s / plain_s:.3f}", f"{(added - update_s - closed_s) * 1e6:.0f}",
                     f"{op_counts['fast'] - op_counts['plain']}",
                     f"{op_counts['lean'] - op_counts['plain']}"])
        if num_tasks == 2:
            gc.collect()
            gc.disable()
            profiler = cProfile.Profile(time.thread_time)  # CPU time: preemption does not count
            profiler.enable()
            for _ in range(calls):
                flow.fn()
            profiler.disable()
            gc.enable()
            stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
            own = sorted(((tt / calls, calls_n / calls, f"{os.path.basename(file)}:{line} {fn}")
                          for (file, line, fn), (_, calls_n, tt, _, _) in stats.items()
                          if "gradnorm_func" in file and "repro" not in file), reverse=True)
            total_own = sum(t for t, _, _ in own)
            top_rows = [[name, f"{n:.0f}", f"{t * 1e6:.1f}"] for t, n, name in own[:12]]
            top_rows.append(["all gradnorm_func functions", "", f"{total_own * 1e6:.1f}"])
            gc.collect()
            gc.disable()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(calls):
                    flow.fn()
            with profile(activities=[ProfilerActivity.CPU]) as prof_plain:
                for _ in range(calls):
                    plain.fn()
            gc.enable()
            fast_ops, plain_ops = robust_self_times(prof, calls), robust_self_times(prof_plain, calls)
            extra = sorted(((fast_ops[k][0] - plain_ops.get(k, (0.0, 0.0))[0],
                             fast_ops[k][1] - plain_ops.get(k, (0.0, 0.0))[1], k) for k in fast_ops),
                           reverse=True)
            op_rows = [[k, f"{n:+.0f}", f"{t:+.1f}"] for t, n, k in extra[:12]]
    markdown(["T", "rounds", "fast", "fork alone", "lean", "flop limit", "plain us", "added us",
              "update us", "closed form us", "1 + closed form / plain", "rest us", "added aten ops",
              "lean: added aten ops"],
             rows)
    print("### Phases of the added time, in place (thread time, us per step)\n")
    print("The library's functions timed where they run, the plain, one-line and lean steps "
          "alternating (toy, batch 100, mean over the steps). `closed form` = the T gradients "
          "at W (bmm, bias sums, ReLU mask) in the hook on z_t; `fork in the model` = added - "
          "all timed phases: the heads reading the expanded z_t and its backward summing the T "
          "cotangents, the tensor hooks' dispatch, the timers' own cost; `gn(L_i)` = the "
          "forward (checks, the weighted sum, arming the record, the hook on L_i); `records` = "
          "the forward hooks on W and on the fork; `hook` = the rest of the hook on z_t; "
          "`norms` = `gradient_norms`; `update` = `step_from_norms` (statistics, Adam, checks, "
          "skip); `after backward` = the rest of the callback at the end of the backward "
          "(the records' results, the window, the state's buffers).\n")
    markdown(["T", "plain", "added", "lean: added", "closed form", "fork in the model", "gn(L_i)",
              "records", "hook", "norms", "update", "after backward"],
             [phase_row(t, 40 if args.quick else 200 if t < 50 else 80)
              for t in ((2, 10) if args.quick else (2, 10, 50))])
    print("### T=2: own time of the library's Python functions (cProfile, thread-time clock), "
          "us per step\n")
    markdown(["function", "calls per step", "own us per step"], top_rows)
    print("### T=2: aten ops and autograd nodes with the most added self time (torch.profiler; "
          "median self time of a call x calls), us per step\n")
    markdown(["op", "added calls", "added self us"], op_rows)
    print("cProfile and the profiler slow every call down; read their columns relative to each "
          "other.\n")


# =========================================================================== main
def machine(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        cpu = ""
    return f"{name}; CPU {cpu or platform.machine()} ({os.cpu_count()} cores)"


def sync_check(device: torch.device) -> None:
    """Runs each wrapper flow once under ``torch.cuda.set_sync_debug_mode("error")``."""
    print("## Host syncs (CUDA, `torch.cuda.set_sync_debug_mode(\"error\")`)\n")
    rows = []
    for work, fast in ((models.toy(10, 100, stacked=True), "fork"),
                       (models.toy(10, 100, stacked=False), "heads"),
                       (models.conv(), "heads"), (models.transformer(), "heads")):
        work = work.to(device)
        for name, variant in variants(work, fast, every=(4,), naive=False).items():
            for _ in range(5):  # past the first updates (L_i(0)) and a whole window
                variant.fn()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                variant.fn()  # one call: one step, or one whole window of update_every steps
                result = "no sync"
            except RuntimeError as error:
                result = f"**sync**: {str(error).splitlines()[0][:80]}"
            finally:
                torch.cuda.set_sync_debug_mode(0)
            rows.append([work.name, name, result])
    markdown(["model", "flow", "result"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="fewer rows and rounds (toy T in 2, 10; ~2-3 minutes on 2 CPU cores)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds (default 15, quick 7). Toy and functional rows take as many as "
                             "fit in a time budget, at least 7 and at most 5 x N; the conv and "
                             "transformer models take N/2, at least 5 (quick: N/3, at least 3)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--only", choices=("toy", "conv", "transformer", "functional", "memory",
                                           "ops", "profile"), action="append",
                        help="run only these sections (repeatable)")
    args = parser.parse_args()
    if args.rounds is None:
        args.rounds = 7 if args.quick else 15
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available in this torch build or on this machine "
                     f"(torch {torch.__version__}, torch.cuda.is_available() is False)")
    device = torch.device(args.device)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    clock = Clock(device)
    summary = Summary()
    sections = args.only or ["toy", "functional", "conv", "transformer", "memory", "ops", "profile"]
    started = time.perf_counter()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"# GradNorm overhead: `{' '.join(['python', *sys.argv])}`\n")
    print(f"torch {torch.__version__}, Python {platform.python_version()}, device {device} "
          f"({machine(device)}), {torch.get_num_threads()} torch thread, clock "
          f"{'CUDA events' if device.type == 'cuda' else 'time.thread_time()'}, load average at "
          f"start {' '.join(f'{x:.2f}' for x in load) if load else 'n/a'}\n")
    if "toy" in sections:
        toy_section(args, device, clock, summary)
    if "functional" in sections:
        functional_section(args, device, clock, summary)
    if "conv" in sections:
        model_section(models.conv(), args, device, clock, summary)
    if "transformer" in sections:
        model_section(models.transformer(), args, device, clock, summary)
    if "memory" in sections:
        memory_section(args, device, summary)
    if "ops" in sections:
        ops_section(args, device)
    if "profile" in sections:
        profile_section(args, device, clock)
    if device.type == "cuda":
        sync_check(device)
    if summary.targets:
        print("## Targets\n")
        markdown(["target", "measured", "met?"], [[w, v, yes(m)] for w, v, m in summary.targets])
        missed = [w for w, _, m in summary.targets if not m]
        print(f"{len(summary.targets) - len(missed)} of {len(summary.targets)} targets met"
              + (f"; not met: {'; '.join(missed)}" if missed else "") + "\n")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"Finished in {time.perf_counter() - started:.0f} s; load average at end "
          f"{' '.join(f'{x:.2f}' for x in load) if load else 'n/a'}.")


if __name__ == "__main__":
    main()
