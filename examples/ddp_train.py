"""GradNorm under DistributedDataParallel, on the paper's toy problem (Chen et al. 2018, Sec. 4).

Run: torchrun --standalone --nproc_per_node=2 examples/ddp_train.py [--steps 100]

Every rank trains on its shard of the data (``DistributedSampler``). The training step is the
single-process one, ``loss = gn(L_i); loss.backward()``: DDP averages the model's gradients
during the backward, and at its end GradNorm all-reduces the per-task gradients of the shared
layer and the task losses once, so every rank takes the global-batch step and holds the same
task weights. The heads read per-task copies of the shared representation
(``model.fork = gn.fork``), the fast path. Uses NCCL on GPUs and gloo on CPU.
"""

from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (imported before init_process_group: see main)
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import gradnorm_func as gf
from gradnorm_func.repro.toy import ToyMultiTaskNet, per_task_mse, toy_regression


def train(steps: int, batch_size: int) -> None:
    cuda = torch.cuda.is_available()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    sigmas = torch.tensor([1.0, 100.0])
    num_tasks = len(sigmas)
    x, y = toy_regression(sigmas, 1000, input_dim=250, output_dim=100, seed=0)
    dataset = TensorDataset(x, y)
    sampler = DistributedSampler(dataset, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler)

    torch.manual_seed(0)
    model = ToyMultiTaskNet(num_tasks).to(device)  # the paper's sizes: 250 -> 4 x 100 -> 100
    # Synchronises by itself because a process group is initialised (sync=None).
    gn = gf.GradNorm(model.last_shared_layer, alpha=0.12, number_of_tasks=num_tasks, lr=0.025,
                     optimizer="adam")
    model.fork = gn.fork  # head i reads copy i of z: the fast path
    ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-3)
    numel = sum(p.numel() for p in model.last_shared_layer.parameters())
    if rank == 0:
        print(f"{world} ranks; all-reduce per step: {num_tasks * (numel + 1) + 1} float32 values "
              f"= {4 * (num_tasks * (numel + 1) + 1)} bytes")

    step, epoch = 0, 0
    while step < steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            L_i = per_task_mse(ddp(x), y)  # [T] task losses on this rank's batch
            gn.local_batch_size = x.shape[0]  # weights the ranks by their batch sizes
            loss = gn(L_i)  # sum_i w_i(t) L_i
            optimizer.zero_grad()
            loss.backward()  # DDP averages the model's gradients; then GradNorm's one all-reduce
            optimizer.step()
            if rank == 0 and (step % max(1, steps // 10) == 0 or step == steps - 1):
                print(f"step {step:4d}  losses {gn.aux.task_losses.tolist()}  "
                      f"weights {gn.w_i.tolist()}")
            step += 1
            if step == steps:
                break
        epoch += 1

    gathered = [torch.empty_like(gn.w_i) for _ in range(world)]
    dist.all_gather(gathered, gn.w_i)
    difference = max((w - gathered[0]).abs().max().item() for w in gathered)
    if rank == 0:  # one rank prints: the ranks' lines could interleave on a shared stdout
        print(f"final weights {gn.w_i.tolist()}; max difference across ranks: {difference:g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    args = parser.parse_args()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    train(args.steps, args.batch_size)
    # Free everything that holds the group, so that destroying it joins the backend's worker
    # threads while the interpreter is alive: gloo threads that outlive the interpreter can
    # abort the process at exit (torch 2.13). torch.distributed.nn is imported before
    # init_process_group because its functions would otherwise keep the group as a default.
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
