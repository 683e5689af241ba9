"""GradNorm under DistributedDataParallel, on the paper's toy problem (Chen et al. 2018, Sec. 4).

Run: torchrun --standalone --nproc_per_node=2 examples/ddp_train.py [--steps 100]

Every rank trains on its shard of the data (``DistributedSampler``); DDP averages the model's
gradients and ``GradNorm`` all-reduces the per-task gradients of the shared layer and the
task losses once per step, so every rank holds the same task weights. Uses NCCL on GPUs and
gloo on CPU.
"""

from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (imported before init_process_group: see main)
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import gradnorm_func as gf


class ToyNet(nn.Module):
    """A trunk of 4 ReLU layers of 100 units (the last one is shared layer W), one head per task."""

    def __init__(self, num_tasks: int, dim: int = 250, hidden: int = 100) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                   nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.shared = nn.Linear(hidden, hidden)
        self.heads = nn.Linear(hidden, num_tasks * 100)  # T affine heads of 100 outputs, stacked
        self.num_tasks = num_tasks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.relu(self.shared(self.trunk(x)))
        return self.heads(z).view(x.shape[0], self.num_tasks, 100)


def toy_data(num_samples: int, sigmas: torch.Tensor, dim: int = 250) -> TensorDataset:
    """f_i(x) = sigma_i tanh((B + eps_i) x), B ~ N(0, 10), eps_i ~ N(0, 3.5) (std devs)."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(100, dim, generator=gen) * 10
    maps = base + torch.randn(len(sigmas), 100, dim, generator=gen) * 3.5
    # x ~ N(0, 1 / (100 dim)), so that (B + eps_i) x has unit scale and tanh is not saturated.
    x = torch.randn(num_samples, dim, generator=gen) / dim**0.5 / 10
    y = sigmas[:, None] * torch.tanh(torch.einsum("tod,nd->nto", maps, x))
    return TensorDataset(x, y)


def train(steps: int, batch_size: int) -> None:
    cuda = torch.cuda.is_available()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    sigmas = torch.tensor([1.0, 100.0])
    num_tasks = len(sigmas)
    dataset = toy_data(1000, sigmas)
    sampler = DistributedSampler(dataset, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler)

    torch.manual_seed(0)
    model = ToyNet(num_tasks).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-3)
    # Synchronises automatically because a process group is initialised (sync=None).
    gn = gf.GradNorm(model.shared, alpha=0.12, number_of_tasks=num_tasks, lr=0.025,
                     optimizer="adam")
    numel = sum(p.numel() for p in model.shared.parameters())
    if rank == 0:
        print(f"{world} ranks; all-reduce per step: {num_tasks * (numel + 1) + 1} float32 values "
              f"= {4 * (num_tasks * (numel + 1) + 1)} bytes")

    step, epoch = 0, 0
    while step < steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            L_i = ((ddp(x) - y) ** 2).mean(dim=(0, 2))  # [T] task losses on this rank's batch
            loss = (gn.w_i * L_i).sum()
            gn.local_batch_size = x.shape[0]
            gn.step(L_i)  # global-batch norms and losses; identical weights on every rank
            optimizer.zero_grad()
            loss.backward()  # DDP averages the model's gradients as usual
            optimizer.step()
            if rank == 0 and (step % max(1, steps // 10) == 0 or step == steps - 1):
                print(f"step {step:4d}  losses {gn.aux.losses.tolist()}  weights {gn.w_i.tolist()}")
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
