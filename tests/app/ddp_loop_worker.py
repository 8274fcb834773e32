"""One rank of ``run_loop`` under ``torchrun`` (gloo on CPU), for tests/app/test_loop_distributed.py.

Every rank builds the same S²FT tiny LLaMA, trains with :func:`fxsparse.app.loop.run_loop` on its half of
each global batch, and rank 0 writes the trainable parameters and the logged losses to ``OUT``:
:func:`reference` trains the whole batch in one process and must reach the same values.

    torchrun --nproc_per_node 2 tests/app/ddp_loop_worker.py OUT
"""

from __future__ import annotations

import sys

import torch

GLOBAL_BATCH, LENGTH, VOCAB, STEPS = 4, 12, 96, 3


def build():
    import fxsparse
    from fxsparse.models import tiny_model

    return fxsparse.transform(tiny_model("llama"), recipe="s2ft", ratios={"o": 0.5, "down": 0.25}, seed=0)


def batches():
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, LENGTH), generator=generator) for _ in range(STEPS)]


def train(model, rank: int = 0, world: int = 1) -> dict:
    from fxsparse.app.loop import run_loop

    pending = iter(batches())
    share = GLOBAL_BATCH // world

    def step() -> tuple[float, int]:
        ids = next(pending)[rank * share:(rank + 1) * share]
        loss = model(input_ids=ids, labels=ids).loss  # equal shares: the mean of rank means is the batch mean
        loss.backward()
        return float(loss.detach()), ids.numel()

    result = run_loop(model, step, steps=STEPS, lr=1e-2, max_grad_norm=0.5, progress=False)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"params": trainable, "losses": result.losses, "tokens": result.tokens}


def reference() -> dict:
    return train(build())


if __name__ == "__main__":
    import torch.distributed as dist

    from fxsparse.app.loop import init_distributed

    torch.set_num_threads(1)
    rank, world = init_distributed()
    assert world == 2 and dist.is_initialized()
    out = train(build(), rank, world)
    gathered = [None] * world
    dist.all_gather_object(gathered, {n: float(p.double().sum()) for n, p in out["params"].items()})
    if rank == 0:
        torch.save({**out, "world": world, "in_sync": gathered[0] == gathered[1]}, sys.argv[1])
