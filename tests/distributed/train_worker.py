"""One rank of a small distributed training run on CPU (gloo), for tests/fxsparse/test_fsdp.py.

Launched like ``torchrun`` launches a script: the environment holds RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT (``torchrun --nproc_per_node 2 tests/distributed/train_worker.py ...`` works too). Every rank builds
the same transformed tiny model, wraps it (``fsdp``: ``fully_shard`` per decoder block and at the root;
``ddp``: ``DistributedDataParallel``), trains ``--steps`` steps on its contiguous share of one global batch,
and rank 0 writes the full parameters (``torch.save``) to ``--out``. :func:`reference` trains the same
model on the whole global batch in one process: the two must agree.

    torchrun --nproc_per_node 2 tests/distributed/train_worker.py --recipes s2ft,sltrain --out params.pt
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.distributed as dist

GLOBAL_BATCH, LENGTH, VOCAB = 4, 12, 96
RECIPES = {
    "s2ft": ("s2ft", {"ratios": {"o": 0.34, "v": 0.5, "down": 0.1, "up": 0.1}, "seed": 0}),
    "sltrain": ("sltrain", {"rank": 4, "sparsity": 0.05, "seed": 0}),
    "sltrain-block": ("sltrain", {"rank": 4, "sparsity": 0.1, "support": "block", "block_size": 8, "seed": 0}),
}


def build(recipe: str, arch: str = "llama") -> torch.nn.Module:
    """The same transformed tiny model on every rank (both the weights and the selection are seeded)."""
    import fxsparse
    from fxsparse.models import tiny_model

    name, options = RECIPES[recipe]
    model = fxsparse.transform(tiny_model(arch, seed=0), name, **options)
    model.train()
    return model


def global_batches(steps: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    return [torch.randint(0, VOCAB, (GLOBAL_BATCH, LENGTH), generator=generator) for _ in range(steps)]


def train(model: torch.nn.Module, steps: int, rank: int = 0, world: int = 1) -> list[float]:
    """SGD with momentum on the trainable parameters; rank ``rank`` of ``world`` takes its rows of each batch.

    Every rank's loss is a mean over the same number of tokens, so the average of the ranks' gradients
    (what DDP and FSDP reduce) is the gradient of the global batch's mean loss.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01)
    share = GLOBAL_BATCH // world
    losses = []
    for ids in global_batches(steps):
        mine = ids[rank * share:(rank + 1) * share]
        loss = model(input_ids=mine, labels=mine).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:  # report the global batch's loss: the mean of the ranks' means (equal token counts)
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    return losses


def reference(recipe: str, steps: int) -> dict[str, torch.Tensor]:
    """Single-process training on the whole global batch: parameter name -> value."""
    model = build(recipe)
    train(model, steps)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameter name -> full value; FSDP's sharded DTensors are gathered (a collective: every rank calls it)."""
    out = {}
    for name, p in model.named_parameters():
        value = p.detach()
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        out[name.removeprefix("module.")] = value.clone()
    return out


def adapter_tensors(model: torch.nn.Module, rank: int) -> dict[str, torch.Tensor] | None:
    """``fxsparse.save_adapter`` of an FSDP2 model: unshard every FSDP module (a collective), save on rank 0."""
    import tempfile

    from torch.distributed.fsdp import FSDPModule

    import fxsparse
    from fxsparse.adapters import read_adapter

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in sharded:
        module.unshard()
    tensors = None
    if rank == 0:
        with tempfile.TemporaryDirectory() as folder:
            tensors = read_adapter(fxsparse.save_adapter(model, folder))[1]
    for module in sharded:
        module.reshard()
    return tensors


def wrap(model: torch.nn.Module, how: str) -> torch.nn.Module:
    """``fsdp``: FSDP2 ``fully_shard`` on every decoder block, then the root; ``ddp``: DistributedDataParallel."""
    if how == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers:
            fully_shard(block)
        return fully_shard(model)
    return torch.nn.parallel.DistributedDataParallel(model)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", default="s2ft", help=f"comma-separated, of {sorted(RECIPES)}")
    parser.add_argument("--wraps", default="fsdp", help="comma-separated, of fsdp, ddp")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", required=True, help="rank 0 writes {'recipe/wrap': {params, losses}} here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        if GLOBAL_BATCH % world:
            raise SystemExit(f"the global batch {GLOBAL_BATCH} does not split over {world} ranks")
        results = {}
        for recipe in args.recipes.split(","):
            built = build(recipe)
            for how in args.wraps.split(","):
                model = wrap(copy.deepcopy(built), how)
                losses = train(model, args.steps, rank, world)
                sharded = sum(1 for p in model.parameters() if hasattr(p, "full_tensor"))  # DTensors under FSDP
                results[f"{recipe}/{how}"] = {"params": full_parameters(model), "losses": losses, "sharded": sharded}
                if recipe == "s2ft" and how == "fsdp":
                    results[f"{recipe}/{how}"]["adapter"] = adapter_tensors(model, rank)
        if rank == 0:
            torch.save(results, args.out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
