"""Per-rank bodies of the multi-process tests, and their single-process references.

Each worker joins a gloo group on 127.0.0.1, trains the toy multi-task net under
``DistributedDataParallel`` on its slice of every global batch, and saves what it saw with
``torch.save`` to ``<out>/rank<r>.pt`` for the parent test to compare.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
from multitask import MultiTaskNet, task_data, task_losses
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

import gradnorm_func as gf

NUM_TASKS = 3
STEPS = 6  # the last one has an uneven global batch
NAN_STEP = 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def global_batches() -> list[tuple[Tensor, Tensor]]:
    """STEPS global batches of 12 samples, then one of 7 (uneven over 2 or 3 ranks)."""
    sizes = [12] * (STEPS - 1) + [7]
    return [task_data(NUM_TASKS, batch=n, seed=t, dtype=torch.float64) for t, n in enumerate(sizes)]


def make_model() -> MultiTaskNet:
    torch.manual_seed(0)
    return MultiTaskNet(NUM_TASKS).double()


def train(model: torch.nn.Module, shared: torch.nn.Module, batches: list[tuple[Tensor, Tensor]], *,
          weight_by_batch: bool, poison: bool = False, **options) -> dict[str, Tensor]:
    """SGD with the stateful GradNorm; returns the weights, counts and finite flags per step."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    gn = gf.GradNorm(shared, 1.5, NUM_TASKS, lr=0.05, optimizer="adam", dtype=torch.float64,
                     **options)
    weights, counts, finite = [], [], []
    for t, (x, y) in enumerate(batches):
        opt.zero_grad()
        L_i = task_losses(model, x, y)
        loss = (gn.w_i * L_i).sum()
        if weight_by_batch:
            gn.local_batch_size = x.shape[0]
        nan = torch.tensor([float("nan")] + [1.0] * (NUM_TASKS - 1), dtype=L_i.dtype)
        gn.step(L_i * nan if poison and t == NAN_STEP else L_i)
        loss.backward()
        opt.step()
        weights.append(gn.w_i)
        counts.append(gn.state.update_count)
        finite.append(gn.aux.finite)
    return {"weights": torch.stack(weights), "counts": torch.stack(counts),
            "finite": torch.stack(finite)}


def reference(weight_by_batch: bool = True) -> dict[str, Tensor]:
    """One process over the concatenated global batches, no DDP."""
    model = make_model()
    return train(model, model.shared, global_batches(), weight_by_batch=weight_by_batch)


def ddp_run(rank: int, world: int, weight_by_batch: bool, poison: bool = False) -> dict[str, Tensor]:
    model = make_model()
    ddp = DistributedDataParallel(model)
    local = [(x.tensor_split(world)[rank], y.tensor_split(world)[rank]) for x, y in global_batches()]
    out = train(ddp, model.shared, local, weight_by_batch=weight_by_batch,
                poison=poison and rank == world - 1)
    out["params"] = torch.cat([p.detach().flatten() for p in model.parameters()])
    return out


def functional_run(rank: int, world: int, *, compile: bool = False,
                   group: dist.ProcessGroup | None = None) -> Tensor:
    """Weights after functional steps on the rank's slice, synchronised over ``group``:
    the last three batches eagerly (the last is uneven), the first two of them compiled.
    ``functional_run(0, 1)`` is the single-process reference."""
    model = make_model().float()
    params = {k: v.detach() for k, v in model.named_parameters()}
    shared = {k: params[k] for k in ("shared.weight", "shared.bias")}

    def gradnorm_step(state, x, y, n):
        def losses(p):
            return task_losses(lambda v: torch.func.functional_call(model, {**params, **p}, (v,)),
                               x, y)
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
    model = MultiTaskNet(2 + rank)
    x, y = task_data(2 + rank)
    gn = gf.GradNorm(model.shared, 1.5, 2 + rank)
    try:
        gn.step(task_losses(model, x, y))
    except ValueError as err:
        return str(err)
    return ""


def worker(rank: int, world: int, port: int, out: str, compile: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {
            "weighted": ddp_run(rank, world, weight_by_batch=True),
            "unweighted": ddp_run(rank, world, weight_by_batch=False),
            "poisoned": ddp_run(rank, world, weight_by_batch=True, poison=True),
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
