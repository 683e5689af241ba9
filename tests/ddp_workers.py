"""Per-rank bodies of the multi-process tests, and their single-process references.

Each worker joins a gloo group on 127.0.0.1, trains the toy multi-task net
(``gradnorm_func.repro.toy``) under ``DistributedDataParallel`` on its slice of every global
batch, and saves what it saw with ``torch.save`` to ``<out>/rank<r>.pt`` for the parent test
to compare.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

import gradnorm_func as gf
from gradnorm_func.repro.toy import ToyMultiTaskNet, per_task_mse, toy_regression

NUM_TASKS = 3
SIGMAS = torch.tensor([1.0, 10.0, 100.0])
INPUT_DIM, HIDDEN, OUTPUT_DIM = 6, 16, 2
STEPS = 6  # the last one has an uneven global batch
NAN_STEP = 3
WINDOWS, MICRO_BATCHES = 3, 2  # accumulation: windows of 2 micro-batches per rank


def batch(n: int, seed: int) -> tuple[Tensor, Tensor]:
    x, y = toy_regression(SIGMAS, n, input_dim=INPUT_DIM, output_dim=OUTPUT_DIM, seed=seed)
    return x.double(), y.double()


def global_batches() -> list[tuple[Tensor, Tensor]]:
    """STEPS - 1 global batches of 12 samples, then one of 7 (uneven over 2 or 3 ranks)."""
    sizes = [12] * (STEPS - 1) + [7]
    return [batch(n, seed=t) for t, n in enumerate(sizes)]


def window_batches() -> list[tuple[Tensor, Tensor]]:
    """WINDOWS global batches of 12 samples, one per accumulation window: 6 per rank (2 ranks)
    or 4 (3 ranks), as 2 equal micro-batches."""
    return [batch(12, seed=100 + t) for t in range(WINDOWS)]


def make_model(num_tasks: int = NUM_TASKS, *, separate_heads: bool = False) -> ToyMultiTaskNet:
    torch.manual_seed(0)
    return ToyMultiTaskNet(num_tasks, input_dim=INPUT_DIM, hidden=HIDDEN, depth=2,
                           output_dim=OUTPUT_DIM, separate_heads=separate_heads).double()


def make_gradnorm(model: ToyMultiTaskNet, fast: str | None = None, **options: Any) -> gf.GradNorm:
    """GradNorm at the last shared layer; ``fast``: None, "heads" (``heads=``) or "fork"."""
    heads = model.heads if fast == "heads" else None
    gn = gf.GradNorm(model.last_shared_layer, 1.5, model.num_tasks, lr=0.05, optimizer="adam",
                     dtype=torch.float64, heads=heads, **options)
    if fast == "fork":
        model.fork = gn.fork
    return gn


def train(model: torch.nn.Module, gn: gf.GradNorm, batches: list[tuple[Tensor, Tensor]], *,
          flow: str = "step", weight_by_batch: bool = True, poison: bool = False
          ) -> dict[str, Tensor]:
    """SGD with the stateful GradNorm, ``flow`` "step" (``gn.step`` before the backward) or
    "one-line" (``loss = gn(L_i)``); the weights, update counts and skip flags per step."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    weights, counts, skipped = [], [], []
    for t, (x, y) in enumerate(batches):
        opt.zero_grad()
        if weight_by_batch:
            gn.local_batch_size = x.shape[0]
        L_i = per_task_mse(model(x), y)
        if flow == "one-line":
            loss = gn(L_i)
        else:
            loss = (gn.w_i * L_i).sum()
            nan = torch.tensor([float("nan")] + [1.0] * (NUM_TASKS - 1), dtype=L_i.dtype)
            gn.step(L_i * nan if poison and t == NAN_STEP else L_i)
        loss.backward()
        opt.step()
        weights.append(gn.w_i)
        counts.append(gn.update_count)
        skipped.append(gn.skipped)
    return {"weights": torch.stack(weights), "counts": torch.stack(counts),
            "skipped": torch.stack(skipped)}


def reference(*, separate_heads: bool = False) -> dict[str, Tensor]:
    """One process over the concatenated global batches, no DDP, ``gn.step``, general path."""
    model = make_model(separate_heads=separate_heads)
    return train(model, make_gradnorm(model), global_batches())


def local_slices(batches: list[tuple[Tensor, Tensor]], rank: int, world: int
                 ) -> list[tuple[Tensor, Tensor]]:
    return [(x.tensor_split(world)[rank], y.tensor_split(world)[rank]) for x, y in batches]


def ddp_run(rank: int, world: int, *, flow: str = "step", fast: str | None = None,
            weight_by_batch: bool = True, poison: bool = False) -> dict[str, Tensor]:
    model = make_model(separate_heads=fast == "heads")
    gn = make_gradnorm(model, fast)
    ddp = DistributedDataParallel(model)
    out = train(ddp, gn, local_slices(global_batches(), rank, world), flow=flow,
                weight_by_batch=weight_by_batch, poison=poison and rank == world - 1)
    out["params"] = torch.cat([p.detach().flatten() for p in model.parameters()])
    return out


def accumulation_reference() -> Tensor:
    """One process, one ``gn.step`` per window on the window's whole global batch."""
    model = make_model(separate_heads=True)
    return train(model, make_gradnorm(model), window_batches())["weights"]


class CollectiveCounter:
    """Counts the collectives issued on one process group.

    GradNorm is given a process group of its own (``dist.new_group``) that nothing else uses:
    DDP's gradient buckets and buffer broadcasts go to the world group. Two independent
    counts then see every collective GradNorm issues, however it issues them:

    * ``sequence``: the group's own collective sequence number, which the c10d backend
      advances once per collective of any kind (``dist.*`` or functional collectives);
    * ``calls``: calls of ``funcol.all_reduce`` and ``dist.all_reduce`` on this group, by
      wrapping both functions for the duration of the run.
    """

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.calls = 0
        self._originals = (funcol.all_reduce, dist.all_reduce)

    def sequence(self) -> int:
        return int(self.group._get_sequence_number_for_group())

    def __enter__(self) -> CollectiveCounter:
        functional, eager = self._originals

        def counted_functional(tensor: Tensor, op: str, group: Any, *args: Any, **kwargs: Any):
            self.calls += group is self.group
            return functional(tensor, op, group, *args, **kwargs)

        def counted_eager(tensor: Tensor, *args: Any, **kwargs: Any):
            group = kwargs.get("group", args[1] if len(args) > 1 else None)  # (op, group, ...)
            self.calls += group is self.group
            return eager(tensor, *args, **kwargs)

        funcol.all_reduce, dist.all_reduce = counted_functional, counted_eager
        return self

    def __exit__(self, *exc: object) -> None:
        funcol.all_reduce, dist.all_reduce = self._originals


def accumulation_run(rank: int, world: int, group: dist.ProcessGroup) -> dict[str, Tensor]:
    """``accumulation_steps=2`` in the one-line flow under DDP (``no_sync`` on the first
    micro-batch): the weights after each window, and GradNorm's collectives counted after
    every micro-batch."""
    model = make_model(separate_heads=True)
    gn = make_gradnorm(model, "heads", accumulation_steps=MICRO_BATCHES, process_group=group)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    weights, sequence, calls = [], [], []
    with CollectiveCounter(group) as counter:
        start = counter.sequence()
        for x, y in local_slices(window_batches(), rank, world):
            opt.zero_grad()
            for m, (xm, ym) in enumerate(zip(x.tensor_split(MICRO_BATCHES),
                                             y.tensor_split(MICRO_BATCHES))):
                last = m == MICRO_BATCHES - 1
                with nullcontext() if last else ddp.no_sync():
                    loss = gn(per_task_mse(ddp(xm), ym)) / MICRO_BATCHES
                    loss.backward()
                sequence.append(counter.sequence() - start)
                calls.append(counter.calls)
            opt.step()
            weights.append(gn.w_i)
    return {"weights": torch.stack(weights), "sequence": torch.tensor(sequence),
            "calls": torch.tensor(calls), "updates": gn.update_count}


def functional_run(rank: int, world: int, *, compile: bool = False,
                   group: dist.ProcessGroup | None = None) -> Tensor:
    """Weights after functional steps on the rank's slice, synchronised over ``group``:
    the last three batches eagerly (the last is uneven), the first two of them compiled.
    ``functional_run(0, 1)`` is the single-process reference."""
    model = make_model().float()
    params = {k: v.detach() for k, v in model.named_parameters()}
    shared = {k: params[k] for k in ("last_shared_layer.weight", "last_shared_layer.bias")}

    def gradnorm_step(state, x, y, n):
        def losses(p):
            return per_task_mse(torch.func.functional_call(model, {**params, **p}, (x,)), y)
        return gf.step(state, shared, losses, process_group=group, batch_size=n)

    # fullgraph tracing of the collective is the point; aot_eager skips inductor's C++ build
    # (~15 s per rank on CPU). tests/test_compile.py covers inductor without collectives.
    step_fn = (torch.compile(gradnorm_step, fullgraph=True, backend="aot_eager") if compile
               else gradnorm_step)
    state = gf.init_state(NUM_TASKS, alpha=1.5, lr=0.05)
    if group is not None:
        gf.check_same_tasks(NUM_TASKS, sum(v.numel() for v in shared.values()), process_group=group)
    history = []
    for x, y in global_batches()[-3:-1] if compile else global_batches()[-3:]:
        x, y = x.float().tensor_split(world)[rank], y.float().tensor_split(world)[rank]
        state, _ = step_fn(state, x, y, torch.tensor(x.shape[0]))
        history.append(state.weights)
    return torch.stack(history)


def mismatch_run(rank: int) -> str:
    """Rank r declares T = 2 + r tasks; every rank must raise the same clear error."""
    model = make_model(2 + rank)
    x, y = toy_regression(SIGMAS[:1].repeat(2 + rank), 8, input_dim=INPUT_DIM,
                          output_dim=OUTPUT_DIM, seed=0)
    gn = gf.GradNorm(model.last_shared_layer, 1.5, 2 + rank)
    try:
        gn(per_task_mse(model(x.double()), y.double())).backward()
    except ValueError as err:
        return str(err)
    return ""


def worker(rank: int, world: int, out: str, compile: bool) -> None:
    torch.set_num_threads(1)
    # A file rendezvous in the run's own directory: no port to pick, so no race for one.
    dist.init_process_group("gloo", init_method=f"file://{Path(out) / 'rendezvous'}",
                            rank=rank, world_size=world)
    try:
        group = dist.new_group(backend="gloo")  # GradNorm's own group, to count its collectives
        results = {
            "weighted": ddp_run(rank, world),
            "unweighted": ddp_run(rank, world, weight_by_batch=False),
            "poisoned": ddp_run(rank, world, poison=True),
            "one-line": ddp_run(rank, world, flow="one-line"),
            "one-line heads": ddp_run(rank, world, flow="one-line", fast="heads"),
            "one-line fork": ddp_run(rank, world, flow="one-line", fast="fork"),
            "accumulated": accumulation_run(rank, world, group),
            "functional": functional_run(rank, world, group=dist.group.WORLD),
            "mismatch": mismatch_run(rank),
        }
        if compile:
            results["compiled"] = functional_run(rank, world, compile=True, group=dist.group.WORLD)
        torch.save(results, Path(out) / f"rank{rank}.pt")
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()
    # Compiled code still holds the group, so its gloo threads outlive destroy_process_group;
    # one that releases a finished collective during interpreter shutdown aborts the process
    # (torch 2.13). The results are saved: leave without the shutdown.
    os._exit(0)
