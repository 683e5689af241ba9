"""Cost of a GradNorm training step relative to the same step without GradNorm.

Every ratio is the median over rounds of time(step with GradNorm) / time(plain step), timed
interleaved (one of each per round) on one CPU thread, with its interquartile range. Memory is the peak of the running sum of the CPU
allocator's allocations and frees recorded by ``torch.profiler(profile_memory=True)`` during
one step, on top of what was alive before it (parameters and optimiser state).

Run: PYTHONPATH=. python benchmarks/bench_overhead.py [--rounds 20] [--quick] [--no-compile]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.profiler import ProfilerActivity, profile

import gradnorm_func as gf

Step = Callable[[], object]


# --------------------------------------------------------------------------- models
class ToyNet(nn.Module):
    """The paper's toy model: 4 x 100 ReLU trunk (input 250), one Linear(100, 100) per task."""

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for fan_in in (250, 100, 100, 100):
            layers += [nn.Linear(fan_in, 100), nn.ReLU()]
        self.trunk = nn.Sequential(*layers[:-2])
        self.shared = nn.Sequential(*layers[-2:])  # last shared layer, then its ReLU
        self.heads = nn.ModuleList(nn.Linear(100, 100) for _ in range(num_tasks))
        self.fork: Callable[[Tensor], Tensor] | None = None  # gn.fork for the fork(z) flow

    def forward(self, x: Tensor) -> Tensor:
        z = self.shared(self.trunk(x))
        if self.fork is not None:  # heads called without their forward hooks
            return torch.stack([head.forward(v) for head, v in zip(self.heads, self.fork(z).unbind(0))])
        return torch.stack([head(z) for head in self.heads])  # [T, B, 100]


def toy_losses(out: Tensor, y: Tensor) -> Tensor:
    return ((out - y) ** 2).mean((1, 2))


class ConvNet(nn.Module):
    """NYUv2-shaped: conv trunk, last shared conv, heads for segmentation, depth, normals."""

    def __init__(self, classes: int = 13) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU())
        self.shared = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU())

        def head(out: int) -> nn.Module:
            return nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, out, 1),
                                 nn.Upsample(scale_factor=2, mode="bilinear"))

        self.heads = nn.ModuleList([head(classes), head(1), head(3)])

    def forward(self, x: Tensor) -> list[Tensor]:
        z = self.shared(self.trunk(x))
        return [head(z) for head in self.heads]


def conv_losses(outs: list[Tensor], target: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    seg, depth, normals = target
    return torch.stack([
        F.cross_entropy(outs[0], seg),
        (outs[1] - depth).abs().mean(),
        (1 - F.cosine_similarity(F.normalize(outs[2], dim=1), normals, dim=1)).mean(),
    ])


# --------------------------------------------------------------------------- eager steps
def eager_steps(model: nn.Module, x: Tensor, y, losses_fn) -> dict[str, Step]:
    """Plain step, the wrapper's fast path (two flows), its general path and a naive loop."""
    num_tasks = len(model.heads)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    weights = torch.ones(num_tasks)
    fast = gf.GradNorm(model.shared, 0.12, num_tasks, heads=model.heads)
    forked = gf.GradNorm(model.shared, 0.12, num_tasks)
    general = gf.GradNorm(model.shared, 0.12, num_tasks)
    shared = list(model.shared.parameters())
    naive_state = gf.init_state(num_tasks, alpha=0.12, lr=1e-3, optimizer="sgd")

    def plain() -> None:
        opt.zero_grad()
        (weights * general_losses(model, x, y, losses_fn)).sum().backward()
        opt.step()

    def after(gn: gf.GradNorm) -> None:
        opt.zero_grad()  # loss.backward(); gn.step(L_i)
        L_i = losses_fn(model(x), y)
        (gn.w_i * L_i).sum().backward()
        gn.step(L_i)
        opt.step()

    def fast_after() -> None:
        after(fast)

    def fork_after() -> None:  # the model's forward calls gn.fork(z)
        model.fork = forked.fork
        try:
            after(forked)
        finally:
            model.fork = None

    def fast_before() -> None:  # gn.step(L_i); loss.backward()
        opt.zero_grad()
        L_i = losses_fn(model(x), y)
        loss = (fast.w_i * L_i).sum()
        fast.step(L_i)
        loss.backward()
        opt.step()

    def general_path() -> None:
        opt.zero_grad()
        L_i = general_losses(model, x, y, losses_fn)
        loss = (general.w_i * L_i).sum()
        general.step(L_i)
        loss.backward()
        opt.step()

    def naive_loop() -> None:  # what a typical implementation does: autograd.grad per task
        nonlocal naive_state
        opt.zero_grad()
        L_i = general_losses(model, x, y, losses_fn)
        loss = (naive_state.weights * L_i).sum()
        norms = torch.stack([
            torch.sqrt(sum((g ** 2).sum() for g in torch.autograd.grad(L_i[i], shared, retain_graph=True)))
            for i in range(num_tasks)])
        naive_state, _ = gf.step_from_norms(naive_state, L_i, norms)
        loss.backward()
        opt.step()

    steps = {"plain": plain, "wrapper, backward then step": fast_after,
             "wrapper, step then backward": fast_before, "wrapper, no fork (general)": general_path,
             "naive per-task loop": naive_loop}
    if isinstance(model, ToyNet):
        steps["wrapper, fork(z)"] = fork_after
    return steps


def general_losses(model: nn.Module, x: Tensor, y, losses_fn) -> Tensor:
    """The losses with the wrapper's head hooks bypassed: each head reads z itself."""
    z = model.shared(model.trunk(x))
    outs = [head.forward(z) for head in model.heads]
    return losses_fn(torch.stack(outs) if isinstance(outs[0], Tensor) and isinstance(y, Tensor)
                     else outs, y)


# --------------------------------------------------------------------------- functional steps
def functional_toy(model: ToyNet, x: Tensor, y: Tensor):
    """Plain and GradNorm functional steps of the toy model with stacked, vmapped heads."""
    num_tasks = len(model.heads)
    trunk = {k: v.detach() for k, v in model.trunk.named_parameters()}
    shared = {k: v.detach() for k, v in model.shared.named_parameters()}
    heads = {k: torch.stack([h.get_parameter(k).detach() for h in model.heads])
             for k in ("weight", "bias")}
    params = {"trunk": trunk, "shared": shared, "heads": heads}

    def segment(p: dict, h: Tensor) -> Tensor:
        return functional_call(model.shared, p, (h,))

    def head(p: dict, z: Tensor) -> Tensor:
        return F.linear(z, p["weight"], p["bias"])

    def forward(p: dict, z_t: Tensor | None) -> tuple[Tensor, Tensor]:
        h = functional_call(model.trunk, p["trunk"], (x,))
        z = segment(p["shared"], h)
        out = (torch.vmap(head, in_dims=(0, None))(p["heads"], z) if z_t is None
               else torch.vmap(head)(p["heads"], z_t(z)))
        return toy_losses(out, y), h

    def sgd(p: dict, g: dict) -> dict:
        return {k: {n: v - 1e-6 * g[k][n] for n, v in p[k].items()} for k in p}

    def plain(params: dict, weights: Tensor):
        def loss(p):
            L_i, _ = forward(p, None)
            return (weights * L_i).sum()
        return sgd(params, torch.func.grad(loss)(params))

    def gradnorm(params: dict, state: gf.GradNormState, probe: Tensor):
        def loss(p, probe):
            L_i, h = forward(p, lambda z: gf.fork(z, probe))
            return (state.weights * L_i).sum(), (L_i, h)
        (g, fork_grads), (L_i, h) = torch.func.grad(loss, argnums=(0, 1), has_aux=True)(params, probe)
        norms = gf.fork_norms(segment, params["shared"], h, fork_grads, state.weights)
        state, _ = gf.step_from_norms(state, L_i, norms)
        return sgd(params, g), state

    probe = gf.fork_probe(num_tasks, (x.shape[0], 100))
    state = gf.init_state(num_tasks, alpha=0.12, lr=1e-3, optimizer="sgd")
    weights = torch.ones(num_tasks)
    return plain, gradnorm, params, state, probe, weights


# --------------------------------------------------------------------------- measurement
def interleaved(steps: dict[str, Step], rounds: int) -> dict[str, list[float]]:
    """Seconds per step in each round, one of each per round so that drift hits all alike."""
    for fn in steps.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def ratio(times: dict[str, list[float]], name: str, base: str) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratio time(name) / time(base)."""
    per_round = sorted(a / b for a, b in zip(times[name], times[base]))
    q1, q2, q3 = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
    return q2, q1, q3


def peak_bytes(fn: Step) -> int:
    """Peak of the running sum of CPU allocations minus frees during one call of ``fn``."""
    fn()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def row(label: str, times: dict[str, list[float]], base: str, names: list[str],
        target: float | None):
    """Median per-round ratio of each step to ``base``, with its interquartile range."""
    ratios = [ratio(times, n, base) for n in names if n in times]
    met = "" if target is None else ("  met" if ratios[0][0] <= target else "  NOT met")
    cells = "  ".join(f"{m:5.2f}x [{lo:4.2f}-{hi:4.2f}]" for m, lo, hi in ratios)
    goal = "" if target is None else f"  (target <= {target:.2f}x)"
    print(f"{label:<20} {statistics.median(times[base]) * 1e3:7.2f} ms  {cells}{goal}{met}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="T in (2, 10) only, fewer rounds")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rounds = 10 if args.quick else args.rounds
    targets = {2: 1.15, 10: 1.3, 50: 2.0}
    tasks = (2, 10) if args.quick else (2, 5, 10, 20, 50)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, medians of {rounds} "
          "interleaved rounds; ratio = step with GradNorm / plain step\n")
    names = ["wrapper, backward then step", "wrapper, fork(z)",
             "wrapper, step then backward", "wrapper, no fork (general)", "naive per-task loop"]
    print("Paper toy model, batch 100, eager wrapper; median ratio [interquartile range]")
    print(f"{'':<20} {'plain':>10}  " + "  ".join(f"{n:<18}" for n in (
        "bwd+step heads=", "bwd+step fork(z)", "step+bwd", "general", "naive")))
    for batch in (100,) if args.quick else (100, 25, 400):
        for num_tasks in tasks if batch == 100 else (2, 10, 50):
            model = ToyNet(num_tasks)
            x, y = torch.randn(batch, 250), torch.randn(num_tasks, batch, 100)
            steps = eager_steps(model, x, y, toy_losses)
            times = interleaved(steps, rounds if num_tasks < 50 else max(5, rounds // 3))
            row(f"T={num_tasks:<3} batch={batch}", times, "plain", names,
                targets.get(num_tasks) if batch == 100 else None)

    print("\nPaper toy model, batch 100, functional path (stacked heads, vmap; fork + fork_norms)")
    print(f"{'':<20} {'plain':>10}  gradnorm")
    for num_tasks in tasks:
        model = ToyNet(num_tasks)
        x, y = torch.randn(100, 250), torch.randn(num_tasks, 100, 100)
        plain, gradnorm, params, state, probe, weights = functional_toy(model, x, y)
        times = interleaved({"plain": lambda: plain(params, weights),
                             "gradnorm": lambda: gradnorm(params, state, probe)}, rounds)
        row(f"T={num_tasks}", times, "plain", ["gradnorm"], targets.get(num_tasks))
        if not args.no_compile and num_tasks in (2, 10):
            c_plain = torch.compile(plain, fullgraph=True)
            c_gradnorm = torch.compile(gradnorm, fullgraph=True)
            times.update(interleaved({"compiled plain": lambda: c_plain(params, weights),
                                      "compiled gradnorm": lambda: c_gradnorm(params, state, probe)},
                                     rounds))
            row("  compiled", times, "compiled plain", ["compiled gradnorm"], targets.get(num_tasks))

    print("\nNYUv2-shaped conv model, 64x64 inputs, batch 8, T=3 (eager wrapper; heads=model.heads)")
    model = ConvNet()
    x = torch.randn(8, 3, 64, 64)
    target = (torch.randint(0, 13, (8, 64, 64)), torch.rand(8, 1, 64, 64),
              F.normalize(torch.randn(8, 3, 64, 64), dim=1))
    conv_steps = eager_steps(model, x, target, conv_losses)
    times = interleaved(conv_steps, max(5, rounds // 2))
    row("T=3 batch=8", times, "plain", names, 1.10)

    print("\nPeak memory of one step above what lives before it (torch.profiler, profile_memory)")
    for label, steps in (("toy T=10 batch=100", eager_steps(ToyNet(10), torch.randn(100, 250),
                                                           torch.randn(10, 100, 100), toy_losses)),
                         ("conv T=3 batch=8", conv_steps)):
        peaks = {name: peak_bytes(fn) for name, fn in steps.items()}
        cells = "  ".join(f"{n.split(',')[0] if n.startswith('naive') else n}: "
                          f"{peaks[n] / peaks['plain']:.2f}x" for n in names if n in peaks)
        print(f"{label:<22} plain {peaks['plain'] / 2 ** 20:.1f} MiB; {cells} (target <= 1.30x)")


if __name__ == "__main__":
    main()
