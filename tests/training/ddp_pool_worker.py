"""One rank of a long-lived gloo process group used by the DDP property tests.

    python ddp_pool_worker.py RANK WORLD_SIZE PORT

Reads pickled `(task, params)` requests (8-byte length prefix) on stdin, runs them on this rank
with real `torch.distributed` collectives, and answers the same way on the original stdout.
"""

from __future__ import annotations

import os
import pickle
import struct
import sys
from typing import Any, BinaryIO

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from dlpipe.training.module import LightningModel


def read_message(stream: BinaryIO) -> Any:
    header = stream.read(8)
    if len(header) < 8:
        return None
    (size,) = struct.unpack("<Q", header)
    return pickle.loads(stream.read(size))


def write_message(stream: BinaryIO, obj: Any) -> None:
    data = pickle.dumps(obj)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def linear_recipe(seed: int, in_dim: int, classes: int, lr: float, steps: int) -> LightningModel:
    """The same tiny model on every rank (and in the single-process reference)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(in_dim, classes))
    return LightningModel(net, classes, learning_rate=lr, scheduler="cosine", total_steps=steps)


def make_dataset(seed: int, samples: int, in_dim: int, classes: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, in_dim, generator=g)
    w = torch.randn(in_dim, classes, generator=g)
    return TensorDataset(x, (x @ w).argmax(dim=1))


def shard(p: dict[str, Any]) -> dict[str, Any]:
    """Property 1: which samples and how much of each global batch this rank processes."""
    world, rank = dist.get_world_size(), dist.get_rank()
    data = TensorDataset(torch.arange(p["samples"]))
    sampler = DistributedSampler(data, world, rank, shuffle=p["shuffle"], seed=p["seed"])
    sampler.set_epoch(p["epoch"])
    loader = DataLoader(data, batch_size=p["global_batch"] // world, sampler=sampler)
    batches = [b[0].tolist() for b in loader]
    return {"rank": rank, "batches": batches}


def gradients(p: dict[str, Any]) -> dict[str, Any]:
    """Property 2: gradients after DDP's allreduce, plus this rank's own local gradients."""
    rank = dist.get_rank()
    torch.manual_seed(p["seed"])
    net = nn.Sequential(nn.Linear(p["in_dim"], p["hidden"]), nn.Tanh(), nn.Linear(p["hidden"], 3))
    model = LightningModel(net, 3)
    g = torch.Generator().manual_seed(p["seed"] * 100 + rank)  # different data per rank
    x = torch.randn(p["batch"], p["in_dim"], generator=g) * p["scale"]
    y = torch.randint(0, 3, (p["batch"],), generator=g)
    loss, _, _ = model.compute_loss((x, y))
    loss.backward()
    local = [q.grad.clone() for q in model.parameters()]
    model.zero_grad()
    ddp = DistributedDataParallel(model)
    loss = torch.nn.functional.cross_entropy(ddp(x), y)
    loss.backward()
    synced = [q.grad.clone() for q in model.parameters()]
    return {"rank": rank, "local": local, "synced": synced}


def train_ddp(p: dict[str, Any]) -> dict[str, Any]:
    """Property 4: DDP training over the rank's share of each global batch."""
    world, rank = dist.get_world_size(), dist.get_rank()
    model = linear_recipe(p["seed"], p["in_dim"], p["classes"], p["lr"], p["steps"])
    opt = model.configure_optimizers()
    optimizer, scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    ddp = DistributedDataParallel(model)
    data = make_dataset(p["seed"], p["samples"], p["in_dim"], p["classes"])
    sampler = DistributedSampler(data, world, rank, shuffle=True, seed=p["seed"], drop_last=True)
    loader = DataLoader(data, batch_size=p["global_batch"] // world, sampler=sampler)
    step, epoch = 0, 0
    while step < p["steps"]:
        sampler.set_epoch(epoch)
        for x, y in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(ddp(x), y).backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step == p["steps"]:
                break
        epoch += 1
    x, y = data.tensors
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    return {"rank": rank, "params": [q.detach().clone() for q in model.parameters()], "acc": acc}


TASKS = {"shard": shard, "gradients": gradients, "train": train_ddp}


def main() -> None:
    rank, world, port = (int(a) for a in sys.argv[1:4])
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout = sys.stderr  # stray prints must not corrupt the answer stream
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    write_message(out, {"ready": rank})
    while (request := read_message(sys.stdin.buffer)) is not None:
        task, params = request
        try:
            write_message(out, TASKS[task](params))
        except Exception as err:  # reported to the test, which fails with it
            write_message(out, {"error": f"{type(err).__name__}: {err}"})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
