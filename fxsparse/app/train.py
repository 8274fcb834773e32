"""The fine-tuning loop: AdamW over ``fxsparse.trainable_parameters(model)``, resumable to the bit.

It works for any recipe and for plain full fine-tuning, because it only looks at which parameters
require grad. One optimizer step consumes ``grad_accum`` micro-batches; the loss is the sum of token
losses over all of them divided by their total number of response tokens, so two half batches with
``grad_accum=2`` give the same update as one full batch.

>>> from fxsparse.models import tiny_model
>>> from fxsparse.app.data import BatchStream, CharTokenizer, encode_examples, task_splits
>>> tok = CharTokenizer()
>>> stream = BatchStream(encode_examples(tok, task_splits("add", 8, 0)[0]), batch_size=4, pad_id=0)
>>> result = train(tiny_model("llama"), stream, steps=2, lr=1e-3, progress=False)
>>> len(result.losses)
2

The loop itself (schedule, clipping, checkpoints, exact resume) is :func:`fxsparse.app.loop.run_loop`,
shared with ``pretrain``: a checkpoint (trainable parameters, optimizer, scheduler, RNG states, data
position, loss history, the model's identity and the run's settings) is written every ``checkpoint_every``
steps and at the end; ``resume=True`` continues from the latest one and gives exactly the parameters an
uninterrupted run would have reached.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxsparse.app.data import IGNORE_INDEX
from fxsparse.app.loop import (
    NonFiniteLossError,
    TrainResult,
    check_finite_loss,
    check_out_dir,
    lr_factor,
    run_loop,
    write_text_atomic,
)

__all__ = [
    "TrainResult", "train", "accumulate_gradients", "causal_lm_loss", "lr_factor", "CHECKPOINT_NAME",
    "NonFiniteLossError", "check_finite_loss", "check_out_dir", "write_text_atomic",
]

CHECKPOINT_NAME = "last.pt"


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """``(sum of next-token cross-entropies over labelled positions, number of labelled positions)``.

    Where the model supports ``logits_to_keep``, only the columns that hold response tokens go through the
    output layer: with a 49k vocabulary that layer is a large share of a small model's step.
    """
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    targets = batch["labels"][:, 1:].to(device)
    labelled = targets != IGNORE_INDEX
    count = int(labelled.sum())
    if count == 0:
        raise ValueError("batch has no labelled (response) tokens")
    kwargs: dict[str, Any] = {"use_cache": False}
    columns = labelled.any(dim=0).nonzero().flatten()
    first, last = int(columns[0]), int(columns[-1]) + 1
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = torch.arange(first, last, device=device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits[:, first:last]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # softmax over a large vocabulary loses too much in half precision
    loss = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets[:, first:last].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, count


def accumulate_gradients(model: nn.Module, micro_batches: Sequence[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """Backward of the mean token loss over all ``micro_batches`` together; ``(mean loss, token count)``.

    Each micro-batch's summed loss is divided by the token count of the whole group, so the gradient that
    accumulates in ``.grad`` equals the gradient of one batch holding all of them.
    """
    total = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
    if total == 0:
        raise ValueError("micro-batches have no labelled (response) tokens")
    loss_sum = 0.0
    for batch in micro_batches:
        loss, _ = causal_lm_loss(model, batch)
        (loss / total).backward()
        loss_sum += float(loss.detach())
    return loss_sum / total, total


def train(
    model: nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    steps: int,
    lr: float = 1e-4,
    grad_accum: int = 1,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.0,
    betas: Sequence[float] = (0.9, 0.999),
    max_grad_norm: float | None = 1.0,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    resume: bool | str | Path = False,
    progress: bool = True,
    config: Mapping[str, Any] | None = None,
    flags: Mapping[str, str] | None = None,
    model_name: str | None = None,
) -> TrainResult:
    """Train ``model`` for ``steps`` optimizer steps on micro-batches drawn from ``batches``.

    ``batches`` yields dicts from :func:`fxsparse.app.data.collate`; if it has ``state_dict`` /
    ``load_state_dict`` (like :class:`fxsparse.app.data.BatchStream`), its position is checkpointed too.
    ``resume`` is ``True`` (the latest checkpoint in ``checkpoint_dir``) or a checkpoint file; ``config``,
    ``flags`` and ``model_name`` are what a resume must match and how a mismatch is named
    (:func:`fxsparse.app.loop.run_loop`). A NaN or infinite loss raises :class:`NonFiniteLossError` before
    that step updates or saves anything.
    """
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    if (checkpoint_every or resume is True) and checkpoint_dir is None:
        raise ValueError("checkpoint_every and resume=True need a checkpoint_dir")
    checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    resume_path = (checkpoint_path if resume is True else Path(resume)) if resume else None

    def step() -> tuple[float, int]:
        return accumulate_gradients(model, [next(batches) for _ in range(grad_accum)])

    return run_loop(
        model, step, steps=steps, lr=lr, warmup_steps=warmup_steps, schedule=schedule, min_lr_ratio=min_lr_ratio,
        betas=betas, weight_decay=weight_decay, max_grad_norm=max_grad_norm, data=batches,
        checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every, resume=resume_path,
        config={"grad_accum": grad_accum, **(config or {})}, flags={"grad_accum": "--grad-accum", **(flags or {})},
        model_name=model_name, progress=progress,
    )
