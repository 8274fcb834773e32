"""An fxsparse model trained through Hugging Face Accelerate (``accelerator.prepare``), as a user would.

    accelerate launch --multi_gpu --num_processes 2 tests/distributed/accelerate_train.py --out params.pt
    accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 tests/distributed/accelerate_train.py ...

(``--multi_gpu`` is only how ``accelerate launch`` asks for several local processes: on a machine without
GPUs they run on CPU over gloo.) The model is transformed *before* ``prepare``; Accelerate then wraps it
(DDP, or FSDP2 with the FSDP options) like any model. Rank 0 writes the full parameters to ``--out``,
comparable with :func:`train_worker.reference` (same model, batches and optimizer).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_worker  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", choices=sorted(train_worker.RECIPES), default="s2ft")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    from accelerate import Accelerator

    torch.set_num_threads(1)
    # without a GPU, cpu=True is what makes Accelerate use the launcher's processes (MULTI_CPU over gloo)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = train_worker.build(args.recipe)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01)  # as train_worker.train
    model, optimizer = accelerator.prepare(model, optimizer)
    rank, world = accelerator.process_index, accelerator.num_processes
    share = train_worker.GLOBAL_BATCH // world
    for ids in train_worker.global_batches(args.steps):
        mine = ids[rank * share:(rank + 1) * share].to(accelerator.device)
        loss = model(input_ids=mine, labels=mine).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    params = train_worker.full_parameters(model)
    if accelerator.is_main_process:
        torch.save({"params": params, "world": world, "distributed_type": str(accelerator.distributed_type)},
                   args.out)
    accelerator.end_training()


if __name__ == "__main__":
    main()
