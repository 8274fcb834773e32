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

A checkpoint (trainable parameters, optimizer, scheduler, RNG states, data position, loss history) is
written every ``checkpoint_every`` steps and at the end; ``resume=True`` continues from the latest one
and gives exactly the parameters an uninterrupted run would have reached.
"""

from __future__ import annotations

import inspect
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fxsparse
from fxsparse.app.data import IGNORE_INDEX

__all__ = [
    "TrainResult", "train", "accumulate_gradients", "causal_lm_loss", "lr_factor", "CHECKPOINT_NAME",
    "NonFiniteLossError", "check_finite_loss", "check_out_dir", "write_text_atomic",
]

CHECKPOINT_NAME = "last.pt"
_SCHEDULES = ("cosine", "constant")


@dataclass
class TrainResult:
    """What :func:`train` did: per-step mean token loss and learning rate, over all steps so far."""

    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    steps: int = 0
    resumed_from: int = 0
    seconds: float = 0.0
    tokens: int = 0


class NonFiniteLossError(FloatingPointError, ValueError):
    """The training loss became NaN or infinite; a ``ValueError`` too, so the CLI reports it as a clean error."""


def check_finite_loss(loss: float, step: int) -> None:
    """Raise :class:`NonFiniteLossError` naming ``step`` (1-based) and ``loss`` unless ``loss`` is finite.

    Called before the optimizer step, so nothing (parameters, checkpoint, adapter) is updated from it.
    """
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"training loss is {loss} at step {step}; stopped before updating or saving anything for this step "
            "(try a lower learning rate, fp32, or a smaller gradient clip)"
        )


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    A run killed mid-write leaves the previous file intact (or no file), never a truncated one.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".part")
    try:
        partial.write_text(text)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def check_out_dir(out: str | Path, outputs: Sequence[str], resume: Any, overwrite: bool) -> bool:
    """Refuse to start a fresh run over an earlier one in ``out`` unless told to resume or overwrite.

    ``outputs`` are the files (relative to ``out``) that mark an earlier run. Returns whether one is there.
    With ``overwrite``, those files are deleted so that a crash of the new run cannot leave the old
    checkpoint behind for a later ``--resume``.
    """
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: give one of them")
    out = Path(out)
    found = [name for name in outputs if (out / name).exists()]
    if found and not resume and not overwrite:
        raise ValueError(
            f"{str(out)!r} already holds an earlier run ({', '.join(found)}): pass --resume to continue it, "
            "--overwrite to start again from step 0 and replace it, or choose another --out"
        )
    if found and overwrite:
        for name in found:
            (out / name).unlink()
    return bool(found)


def lr_factor(step: int, steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float = 0.1) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Linear warm-up over ``warmup_steps`` up to the peak, then constant, or a cosine from the peak (first step
    after warm-up) down to ``min_lr_ratio`` (last step).

    >>> [round(lr_factor(s, 4, 2, "cosine", 0.0), 3) for s in range(4)]
    [0.5, 1.0, 1.0, 0.0]
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(steps - warmup_steps - 1, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


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


def _named_trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    trainable = {id(p) for p in fxsparse.trainable_parameters(model)}
    return {name: p for name, p in model.named_parameters() if id(p) in trainable}


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part")
    torch.save(state, partial)
    os.replace(partial, path)  # atomic: a run killed mid-write leaves the previous checkpoint intact


def _load_checkpoint(path: Path, params: dict[str, nn.Parameter]) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"no checkpoint to resume from at {str(path)!r}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = state["trainable"]
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise ValueError(
            f"checkpoint {str(path)!r} does not match the model's trainable parameters "
            f"(missing: {missing[:5]}, unexpected: {extra[:5]}); transform the model the same way first"
        )
    with torch.no_grad():
        for name, p in params.items():
            if saved[name].shape != p.shape:
                raise ValueError(
                    f"checkpoint parameter {name!r} has shape {tuple(saved[name].shape)}, "
                    f"model has {tuple(p.shape)}"
                )
            p.copy_(saved[name])
    return state


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
) -> TrainResult:
    """Train ``model`` for ``steps`` optimizer steps on micro-batches drawn from ``batches``.

    ``batches`` yields dicts from :func:`fxsparse.app.data.collate`; if it has ``state_dict`` /
    ``load_state_dict`` (like :class:`fxsparse.app.data.BatchStream`), its position is checkpointed too.
    ``resume`` is ``True`` (the latest checkpoint in ``checkpoint_dir``) or a checkpoint file.
    A NaN or infinite loss raises :class:`NonFiniteLossError` before that step updates or saves anything.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if schedule not in _SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {list(_SCHEDULES)}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
    if (checkpoint_every or resume is True) and checkpoint_dir is None:
        raise ValueError("checkpoint_every and resume=True need a checkpoint_dir")
    params = _named_trainable(model)
    if not params:
        raise ValueError("model has no trainable parameters (nothing requires grad)")

    optimizer = torch.optim.AdamW(params.values(), lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps, warmup_steps, schedule, min_lr_ratio)
    )
    result = TrainResult()
    checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if resume:
        resume_path = checkpoint_path if resume is True else Path(resume)
        state = _load_checkpoint(resume_path, params)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        if state.get("data") is not None and hasattr(batches, "load_state_dict"):
            batches.load_state_dict(state["data"])
        result.losses, result.lrs = list(state["losses"]), list(state["lrs"])
        result.tokens = int(state["tokens"])
        result.steps = result.resumed_from = int(state["step"])
        if result.steps > steps:
            raise ValueError(f"checkpoint {str(resume_path)!r} is at step {result.steps}, past steps={steps}")

    def checkpoint() -> None:
        assert checkpoint_path is not None
        _save_checkpoint(
            checkpoint_path,
            {
                "step": result.steps,
                "trainable": {name: p.detach().cpu() for name, p in params.items()},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": _rng_state(),
                "data": batches.state_dict() if hasattr(batches, "state_dict") else None,
                "losses": result.losses,
                "lrs": result.lrs,
                "tokens": result.tokens,
            },
        )

    from tqdm.auto import tqdm

    was_training = model.training
    model.train()
    start = time.perf_counter()
    bar = tqdm(total=steps, initial=result.steps, disable=not progress, desc="train", unit="step")
    try:
        while result.steps < steps:
            mean_loss, total = accumulate_gradients(model, [next(batches) for _ in range(grad_accum)])
            check_finite_loss(mean_loss, result.steps + 1)
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(list(params.values()), max_grad_norm)
            result.lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(mean_loss)
            result.tokens += total
            result.steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{result.losses[-1]:.4f}", lr=f"{result.lrs[-1]:.2e}")
            if checkpoint_path is not None and (
                (checkpoint_every and result.steps % checkpoint_every == 0) or result.steps == steps
            ):
                checkpoint()
    finally:
        bar.close()
        model.train(was_training)
    result.seconds = time.perf_counter() - start
    return result
