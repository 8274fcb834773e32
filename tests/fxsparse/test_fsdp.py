"""FSDP2 (``fully_shard``) and DDP over 2 CPU processes (gloo) train S²FT and SLTrain models exactly as one process.

One launch of ``tests/distributed/train_worker.py`` on 2 ranks (the environment ``torchrun`` would set) trains
every (recipe, wrapper) pair for a few steps on its half of each global batch; this process trains the same
models on the whole batches; parameters and losses must agree at float32 tolerances. SGD with momentum: it
is linear in the gradients, so the comparison measures what FSDP/DDP compute (Adam's g/sqrt(v) turns
float32 summation-order noise in near-zero gradients into full-size update differences).
"""

import functools
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import fxsparse

WORKER = Path(__file__).resolve().parents[1] / "distributed" / "train_worker.py"
RECIPES, WRAPS, STEPS = ("s2ft", "sltrain", "sltrain-block"), ("fsdp", "ddp"), 3
TOL = {torch.float32: {"rtol": 1.3e-6, "atol": 1e-5}}  # torch.testing's float32 defaults

# slow: two fresh processes import torch/transformers and transform 3 models (~30 s of CPU); CI runs it
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                 reason="torch.distributed with gloo is not available")]


def _worker_module():
    spec = importlib.util.spec_from_file_location("train_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    """{'recipe/wrap': {'params', 'losses', 'sharded'}} from one 2-process run."""
    out = tmp_path_factory.mktemp("dist") / "params.pt"
    port, world = _free_port(), 2
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), "--recipes", ",".join(RECIPES), "--wraps", ",".join(WRAPS),
             "--steps", str(STEPS), "--out", str(out)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    failed = [(rank, p.returncode, log[-3000:]) for rank, (p, log) in enumerate(zip(procs, logs)) if p.returncode]
    assert not failed, f"worker(s) failed: {failed}"
    return torch.load(out)


@functools.cache
def _reference(recipe: str):
    worker = _worker_module()
    model = worker.build(recipe)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = worker.train(model, STEPS)
    after = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return before, after, losses, trainable


@pytest.mark.parametrize("wrap", WRAPS)
@pytest.mark.parametrize("recipe", RECIPES)
def test_two_processes_train_like_one(distributed, recipe, wrap):
    before, after, losses, trainable = _reference(recipe)
    got = distributed[f"{recipe}/{wrap}"]
    assert set(got["params"]) == set(after)
    # the mean of the two ranks' losses is the global batch's loss (equal token counts per rank)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(losses), rtol=1e-3, atol=1e-3)
    for name, value in after.items():
        torch.testing.assert_close(got["params"][name], value, **TOL[torch.float32], msg=name)
        moved = (value - before[name]).abs().max().item()
        assert (moved > 0) == (name in trainable), name  # trained parameters moved, frozen ones did not
    if wrap == "fsdp":
        assert got["sharded"] == len(after)  # every parameter was a sharded DTensor


def test_adapter_saved_from_the_sharded_model(distributed, tmp_path):
    """save_adapter after unsharding the FSDP2 model (rank 0) holds the single-process run's blocks."""
    from fxsparse.adapters import read_adapter

    worker = _worker_module()
    model = worker.build("s2ft")
    worker.train(model, STEPS)
    expected = read_adapter(fxsparse.save_adapter(model, tmp_path))[1]
    got = distributed["s2ft/fsdp"]["adapter"]
    assert set(got) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, **TOL[torch.float32], msg=name)


def test_worker_splits_the_global_batch():
    worker = _worker_module()
    assert worker.GLOBAL_BATCH % 2 == 0
    ids = worker.global_batches(1)[0]
    assert ids.shape == (worker.GLOBAL_BATCH, worker.LENGTH) and torch.equal(ids, worker.global_batches(1)[0])
