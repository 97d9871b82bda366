"""Properties 1, 2 and 4 on a real 2-process gloo group, started once for the whole module.

The ranks are long-lived processes (`ddp_pool_worker.py`) that take examples over a pipe, so
each of the 100 examples per property costs milliseconds, not a process-group start.
"""

from __future__ import annotations

import importlib.util
import math
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, DistributedSampler

WORLD = 2
WORKER = Path(__file__).with_name("ddp_pool_worker.py")
SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)

pytestmark = pytest.mark.ddp


def _load_worker_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ddp_pool_worker", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load_worker_module()


class ProcessGroupPool:
    """WORLD worker processes forming one gloo group; `run` sends one example to every rank."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.procs = [
            subprocess.Popen(
                [sys.executable, str(WORKER), str(rank), str(WORLD), str(port)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
            )
            for rank in range(WORLD)
        ]
        for rank, proc in enumerate(self.procs):
            assert worker.read_message(proc.stdout) == {"ready": rank}

    def run(self, task: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        for proc in self.procs:
            worker.write_message(proc.stdin, (task, params))
        answers = [worker.read_message(proc.stdout) for proc in self.procs]
        for answer in answers:
            assert answer is not None, "a rank died"
            assert "error" not in answer, answer.get("error")
        return answers

    def close(self) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def pool() -> Iterator[ProcessGroupPool]:
    group = ProcessGroupPool()
    yield group
    group.close()


# Feature: deep-learning-pipeline, Property 1: Distributed training workload distribution
@SETTINGS
@given(
    samples=st.integers(1, 300),
    per_rank_batch=st.integers(1, 16),
    shuffle=st.booleans(),
    seed=st.integers(0, 10_000),
    epoch=st.integers(0, 5),
)
def test_each_rank_processes_its_share_of_every_batch(
    pool: ProcessGroupPool, samples: int, per_rank_batch: int, shuffle: bool, seed: int, epoch: int
) -> None:
    global_batch = per_rank_batch * WORLD
    params = {
        "samples": samples,
        "global_batch": global_batch,
        "shuffle": shuffle,
        "seed": seed,
        "epoch": epoch,
    }
    answers = pool.run("shard", params)
    assert sorted(a["rank"] for a in answers) == list(range(WORLD))
    per_rank = [[i for batch in a["batches"] for i in batch] for a in answers]
    share = math.ceil(samples / WORLD)
    for seen in per_rank:
        assert len(seen) == share  # every rank ~1/N of the data (padded to equal size)
    # Together the ranks cover every sample; only the padding repeats a few.
    everything = [i for seen in per_rank for i in seen]
    assert set(everything) == set(range(samples))
    assert len(everything) - samples == share * WORLD - samples < WORLD
    # Step by step, each rank gets 1/N of the global batch.
    steps = {len(a["batches"]) for a in answers}
    assert len(steps) == 1
    for step in range(steps.pop()):
        sizes = [len(a["batches"][step]) for a in answers]
        assert len(set(sizes)) == 1
        if step < len(answers[0]["batches"]) - 1:
            assert sum(sizes) == global_batch


# Feature: deep-learning-pipeline, Property 2: Gradient synchronization consistency
@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    in_dim=st.integers(1, 6),
    hidden=st.integers(1, 6),
    batch=st.integers(1, 8),
    scale=st.floats(0.01, 100.0),
)
def test_gradients_are_identical_on_all_ranks_after_sync(
    pool: ProcessGroupPool, seed: int, in_dim: int, hidden: int, batch: int, scale: float
) -> None:
    params = {"seed": seed, "in_dim": in_dim, "hidden": hidden, "batch": batch, "scale": scale}
    answers = sorted(pool.run("gradients", params), key=lambda a: a["rank"])
    first = answers[0]["synced"]
    for other in answers[1:]:
        for a, b in zip(first, other["synced"], strict=True):
            assert torch.equal(a, b)  # bit-identical on every rank
    # ...and equal to the average of what each rank computed on its own data.
    for i, synced in enumerate(first):
        mean = torch.stack([a["local"][i] for a in answers]).mean(0)
        torch.testing.assert_close(synced, mean, atol=1e-6, rtol=1e-5)


def _single_process_training(p: dict[str, Any]) -> tuple[list[torch.Tensor], float]:
    """The reference: one process, the same global batches (the union of the ranks' shares)."""
    model = worker.linear_recipe(p["seed"], p["in_dim"], p["classes"], p["lr"], p["steps"])
    opt = model.configure_optimizers()
    optimizer, scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    data = worker.make_dataset(p["seed"], p["samples"], p["in_dim"], p["classes"])
    per_rank = p["global_batch"] // WORLD
    step, epoch = 0, 0
    while step < p["steps"]:
        loaders = []
        for rank in range(WORLD):
            sampler = DistributedSampler(
                data, WORLD, rank, shuffle=True, seed=p["seed"], drop_last=True
            )
            sampler.set_epoch(epoch)
            loaders.append(DataLoader(data, batch_size=per_rank, sampler=sampler))
        for shares in zip(*loaders, strict=True):
            x = torch.cat([s[0] for s in shares])
            y = torch.cat([s[1] for s in shares])
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step == p["steps"]:
                break
        epoch += 1
    x, y = data.tensors
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    return [q.detach() for q in model.parameters()], acc


# Feature: deep-learning-pipeline, Property 4: Distributed training equivalence
@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    in_dim=st.integers(1, 5),
    classes=st.integers(2, 4),
    samples=st.integers(8, 64),
    per_rank_batch=st.integers(1, 4),
    steps=st.integers(1, 8),
    lr=st.floats(1e-3, 0.3),
)
def test_ddp_training_matches_one_process_with_the_same_steps(
    pool: ProcessGroupPool,
    seed: int,
    in_dim: int,
    classes: int,
    samples: int,
    per_rank_batch: int,
    steps: int,
    lr: float,
) -> None:
    params = {
        "seed": seed,
        "in_dim": in_dim,
        "classes": classes,
        "samples": samples,
        "global_batch": per_rank_batch * WORLD,
        "steps": steps,
        "lr": lr,
    }
    answers = pool.run("train", params)
    reference, reference_acc = _single_process_training(params)
    for answer in answers:
        for got, want in zip(answer["params"], reference, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        # Equivalent accuracy: same predictions up to ties at the decision boundary.
        assert abs(answer["acc"] - reference_acc) <= 1.0 / samples + 1e-9
