"""The one training loop behind ``fxsparse finetune`` and ``fxsparse pretrain``.

:func:`run_loop` owns everything both commands share: AdamW over the parameters that require grad, the
learning-rate schedule (:func:`lr_factor`), gradient clipping, the stop on a non-finite loss, the
progress bar, periodic evaluation, checkpoints (atomic, with a sha256, see :mod:`fxsparse.app.checkpoint`)
and an exact resume: parameters, optimizer, scheduler, RNG states (torch, CUDA, numpy, Python) and the data
position, so a killed and resumed run reaches bit for bit what an uninterrupted one reaches.

A caller gives it ``step``: a function that draws one optimizer step's micro-batches, runs forward and
backward (accumulating into ``.grad``) and returns ``(mean loss, tokens)``; ``evaluate``: a function
returning held-out numbers; and ``config``: the settings a resume must match. The learning rate, betas,
weight decay and clip are optimizer settings: a resume with other values applies them and says so.

>>> from fxsparse.models import tiny_model
>>> model = tiny_model("llama")
>>> x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
>>> def step():
...     model(input_ids=x, labels=x).loss.backward()
...     return 1.0, x.numel()
>>> run_loop(model, step, steps=2, lr=1e-3, progress=False).tokens
32
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxsparse.app.checkpoint import FIX, load_checkpoint, model_identity, save_checkpoint, sidecar_path

__all__ = [
    "TrainResult", "run_loop", "lr_factor", "SCHEDULES", "NonFiniteLossError", "check_finite_loss",
    "check_out_dir", "write_text_atomic", "rng_state", "set_rng_state", "plot_curves", "CHECKPOINT_FORMAT",
    "command_line", "init_distributed",
]

SCHEDULES = ("cosine", "constant")
CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "fxsparse-train", 2
# settings that only steer the optimizer: a resume may change them (they are applied and reported)
_OPTIMIZER_SETTINGS = ("lr", "betas", "weight_decay", "max_grad_norm")
# ... and ``steps``: a longer (or shorter) run continues on the schedule of the new length
_RESUMABLE_CHANGES = ("steps",)


@dataclass
class TrainResult:
    """What :func:`run_loop` did, over all runs of a resumed training so far.

    ``history`` has one ``{"step", "tokens", "train_loss", "lr", "wall_time_s"}`` per optimizer step (``lr``
    is the rate that step really used), ``evals`` one ``{"step", "tokens", ...}`` per evaluation;
    ``seconds`` is this process's training time, ``wall_time_s`` that of all runs together.
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    resumed_from: int = 0
    seconds: float = 0.0
    wall_time_s: float = 0.0
    tokens: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def losses(self) -> list[float]:
        """Mean training loss of every optimizer step."""
        return [h["train_loss"] for h in self.history]

    @property
    def lrs(self) -> list[float]:
        """Learning rate of every optimizer step."""
        return [h["lr"] for h in self.history]


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
            (out / name).unlink(missing_ok=True)  # missing: another torchrun rank removed it first
            sidecar_path(out / name).unlink(missing_ok=True)
    return bool(found)


def init_distributed() -> tuple[int, int]:
    """``(rank, world size)``; under ``torchrun`` (``WORLD_SIZE`` > 1) the default process group is first
    initialised from the environment (gloo on CPU, nccl on CUDA with this process's ``LOCAL_RANK`` device).

    >>> init_distributed()  # a plain process
    (0, 1)
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not torch.distributed.is_available():
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        import atexit

        atexit.register(dist.destroy_process_group)
    return dist.get_rank(), dist.get_world_size()


def _average_across_ranks(params: Mapping[str, nn.Parameter], loss: float, tokens: int,
                          world: int) -> tuple[float, int]:
    """Data parallelism without wrapping the model: mean gradient, mean loss and summed tokens over all ranks."""
    import torch.distributed as dist

    for p in params.values():
        if p.grad is None:
            p.grad = torch.zeros_like(p)  # a rank whose batch left p unused still joins the collective
        dist.all_reduce(p.grad)
        p.grad.div_(world)
    stats = torch.tensor([loss, float(tokens)], dtype=torch.float64,
                         device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(stats)
    return float(stats[0]) / world, int(stats[1])


def lr_factor(step: int, steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float = 0.1,
              floor_after_last: bool = False) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Linear warm-up over ``warmup_steps`` (``1/w, 2/w, ..., 1``), then constant, or a cosine from the peak
    (first step after warm-up) down to ``min_lr_ratio`` at the last step, ``steps - 1``, or with
    ``floor_after_last`` at ``steps`` (``pretrain``'s schedule: its last step stays just above the floor).

    >>> [round(lr_factor(s, 4, 2, "cosine", 0.0), 3) for s in range(4)]
    [0.5, 1.0, 1.0, 0.0]
    >>> round(lr_factor(60, 110, 10, "cosine", 0.1, floor_after_last=True), 3)
    0.55
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    end = steps if floor_after_last else steps - 1
    progress = min((step - warmup_steps) / max(end - warmup_steps, 1), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def rng_state() -> dict[str, Any]:
    """Every random state a training step may draw from, in a form ``torch.load(weights_only=True)`` reads."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    try:
        import numpy as np
    except ImportError:
        np = None
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plot_curves(path: str | Path, history: Sequence[Mapping[str, Any]], evals: Sequence[Mapping[str, Any]] = (),
                title: str = "", loss_label: str = "loss") -> None:
    """Training loss per step (and held-out ``val_loss``) in one panel, ``val_ppl`` in a second if evaluated."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on CI or servers
    import matplotlib.pyplot as plt

    with_ppl = any("val_ppl" in e for e in evals)
    fig, axes = plt.subplots(1, 2 if with_ppl else 1, figsize=(10 if with_ppl else 6, 3.8), squeeze=False)
    ax = axes[0][0]
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["train_loss"] for h in history], lw=0.9, marker="o" if len(steps) <= 50 else None,
            markersize=3, label="train")
    held = [e for e in evals if "val_loss" in e]
    if held:
        ax.plot([e["step"] for e in held], [e["val_loss"] for e in held], "o-", label="held-out")
        ax.legend()
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(loss_label)
    ax.grid(alpha=0.3)
    if with_ppl:
        ppl = [e for e in evals if "val_ppl" in e]
        axes[0][1].plot([e["step"] for e in ppl], [e["val_ppl"] for e in ppl], "o-")
        axes[0][1].set_yscale("log")
        axes[0][1].set_xlabel("optimizer step")
        axes[0][1].set_ylabel("held-out perplexity")
        axes[0][1].grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def command_line(add_parser: Callable[[Any], Any], command: str, args: argparse.Namespace, **changes: Any) -> str:
    """``fxsparse COMMAND`` with the options of ``args`` that differ from their defaults, ``changes`` (option
    dest -> value) applied; ``--resume``, ``--overwrite`` and ``--stop-at`` left out. For the summary's
    "how to continue" line.

    >>> from fxsparse.app.pretrain import add_parser, parse_args
    >>> command_line(add_parser, "pretrain", parse_args(["--preset", "9m", "--steps", "20"]), steps=40)
    'fxsparse pretrain --preset 9m --steps 40'
    """
    parser = argparse.ArgumentParser(prog="fxsparse")
    subparsers = parser.add_subparsers(dest="command")
    add_parser(subparsers)
    words = ["fxsparse", command]
    for action in subparsers.choices[command]._actions:
        if action.dest in ("help", "resume", "overwrite", "stop_at") or not action.option_strings:
            continue
        value = changes.get(action.dest, getattr(args, action.dest, action.default))
        if value == action.default:
            continue
        words.append(action.option_strings[-1])
        if action.nargs != 0:
            words.extend(str(v) for v in (value if isinstance(value, list) else [value]))
    return " ".join(shlex.quote(word) for word in words)


def _flag(flags: Mapping[str, str], key: str) -> str:
    return flags.get(key, key)


def _check_resume(state: Mapping[str, Any], path: Path, config: Mapping[str, Any], schedule: Mapping[str, Any],
                  identity: Mapping[str, Any], flags: Mapping[str, str]) -> None:
    """Refuse a resume whose run settings, schedule or model differ from the checkpoint's, naming the option."""
    fix = f"resume with the checkpoint's value, or {FIX}"
    saved_config, saved_schedule = state.get("config", {}), state.get("loop", {}).get("schedule", {})
    for saved, current in ((saved_config, config), (saved_schedule, schedule)):
        for key in sorted(set(saved) | set(current)):
            if key in _RESUMABLE_CHANGES:
                continue
            if saved.get(key) != current.get(key):
                raise ValueError(
                    f"--resume: {_flag(flags, key)} is {current.get(key)!r} in this run but "
                    f"{saved.get(key)!r} in checkpoint {str(path)!r}; {fix}"
                )
    saved_identity = state.get("identity", {})

    def refuse(what: str) -> ValueError:
        return ValueError(
            f"--resume: checkpoint {str(path)!r} was written for model {saved_identity.get('name')!r} "
            f"({saved_identity.get('class')}, recipe {saved_identity.get('recipe')}); this run's "
            f"{_flag(flags, 'model')} gives {identity.get('name')!r} ({identity.get('class')}, recipe "
            f"{identity.get('recipe')}) and its {what} differs; {fix}"
        )

    for key, what in (("class", "model class"), ("config_sha256", "model config"), ("recipe", "recipe")):
        if saved_identity.get(key) != identity.get(key):
            raise refuse(what)
    # before the parameter shapes: another selection also gives other block shapes
    if saved_identity.get("plan") != identity.get("plan"):
        raise ValueError(
            f"--resume: the S2FT selection (which heads and channels train) differs from the one in checkpoint "
            f"{str(path)!r}: {_flag(flags, 'plan')} must select the same units (same ratios, criterion, "
            f"layers, seed and, for activation/gradient selection, the same data); {fix}"
        )
    if saved_identity.get("parameters_sha256") != identity.get("parameters_sha256"):
        raise refuse("parameter names, shapes or dtypes")


def _load_parameters(model: nn.Module, params: Mapping[str, nn.Parameter], state: Mapping[str, Any],
                     path: Path) -> None:
    if "model" in state:
        model.load_state_dict(state["model"])
        return
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
                    f"checkpoint parameter {name!r} has shape {tuple(saved[name].shape)}, model has {tuple(p.shape)}"
                )
            p.copy_(saved[name])


def _apply_optimizer_changes(saved: Mapping[str, Any], current: Mapping[str, Any], optimizer, scheduler,
                             factor: Callable[[int], float], step: int, flags: Mapping[str, str]) -> list[str]:
    """After loading the optimizer state: switch to this run's optimizer settings; one note per change."""
    notes = []
    if saved["steps"] != current["steps"]:
        notes.append(f"--resume: {_flag(flags, 'steps')} is {current['steps']} in this run, {saved['steps']} in "
                     f"the checkpoint: the schedule continues from step {step} towards step {current['steps']}")
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor(step)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    for key in _OPTIMIZER_SETTINGS:
        if key not in saved or saved[key] == current[key]:
            continue
        notes.append(f"--resume: {_flag(flags, key)} is {current[key]!r} in this run, {saved[key]!r} in the "
                     f"checkpoint: continuing from step {step} with {current[key]!r}")
        for group in optimizer.param_groups:
            if key == "lr":
                group["initial_lr"] = current["lr"]
                group["lr"] = current["lr"] * factor(step)
            elif key == "betas":
                group["betas"] = tuple(current["betas"])
            elif key == "weight_decay":
                group["weight_decay"] = current["weight_decay"]
        if key == "lr":
            scheduler.base_lrs = [current["lr"]] * len(optimizer.param_groups)
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return notes


def run_loop(
    model: nn.Module,
    step: Callable[[], tuple[float, int]],
    *,
    steps: int,
    lr: float,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.1,
    floor_after_last: bool = False,
    betas: Sequence[float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    data: Any = None,
    checkpoint_path: str | Path | None = None,
    checkpoint_every: int = 0,
    resume: str | Path | None = None,
    full_state: bool = False,
    stop_at: int | None = None,
    evaluate: Callable[[], Mapping[str, float]] | None = None,
    eval_every: int = 0,
    config: Mapping[str, Any] | None = None,
    flags: Mapping[str, str] | None = None,
    model_name: str | None = None,
    progress: bool = True,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` for ``steps`` optimizer steps (or up to ``stop_at``), each one call of ``step``.

    ``data`` (anything with ``state_dict`` / ``load_state_dict``) is the batch source whose position is
    checkpointed. A checkpoint goes to ``checkpoint_path`` every ``checkpoint_every`` steps and after the
    last step run; ``full_state`` stores the whole ``model.state_dict()`` (pre-training) instead of only
    the trainable parameters (fine-tuning). ``resume`` is a checkpoint file: it must match ``config``,
    the schedule and the model (:func:`fxsparse.app.checkpoint.model_identity`), or a ``ValueError``
    names the option (``flags`` maps a setting to its command-line name). ``evaluate`` runs every
    ``eval_every`` steps and after step ``steps``; its numbers go to ``result.evals``. Under ``torchrun``
    every rank calls ``step`` on its own batches, gradients (and the logged loss) are averaged over the
    ranks before clipping, and only rank 0 writes checkpoints.
    A NaN or infinite loss raises :class:`NonFiniteLossError` before that step updates or saves anything.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {list(SCHEDULES)}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
    stop = steps if stop_at is None else stop_at
    if not 1 <= stop <= steps:
        raise ValueError(f"stop_at must be in [1, steps={steps}], got {stop_at}")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("model has no trainable parameters (nothing requires grad)")
    config, flags = dict(config or {}), dict(flags or {})
    rank, world = init_distributed()
    # under torchrun only rank 0 writes checkpoints and shows progress
    checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None and rank == 0 else None
    progress = progress and rank == 0

    def factor(index: int) -> float:
        return lr_factor(index, steps, warmup_steps, schedule, min_lr_ratio, floor_after_last)

    optimizer = torch.optim.AdamW(params.values(), lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda index: factor(index))
    schedule_settings = {"steps": steps, "warmup_steps": warmup_steps, "schedule": schedule,
                         "min_lr_ratio": min_lr_ratio, "floor_after_last": floor_after_last}
    optimizer_settings = {"lr": lr, "betas": list(betas), "weight_decay": weight_decay,
                          "max_grad_norm": max_grad_norm}
    identity = model_identity(model, model_name)
    result = TrainResult()
    if resume is not None:
        path = Path(resume)
        state = load_checkpoint(path)
        if state.get("format") != CHECKPOINT_FORMAT or state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint {str(path)!r} is not a version-{CHECKPOINT_VERSION} fxsparse training "
                             f"checkpoint (written by an older fxsparse?): {FIX}")
        _check_resume(state, path, config, schedule_settings, identity, flags)
        _load_parameters(model, params, state, path)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        if state.get("data") is not None and hasattr(data, "load_state_dict"):
            data.load_state_dict(state["data"])
        saved = state["metrics"]
        result.history, result.evals = list(saved["history"]), list(saved["evals"])
        result.tokens, result.wall_time_s = int(saved["tokens"]), float(saved["wall_time_s"])
        result.steps = result.resumed_from = int(state["step"])
        if result.steps > steps:
            raise ValueError(f"checkpoint {str(path)!r} is at step {result.steps}, past steps={steps}")
        result.notes = list(saved.get("notes", [])) + _apply_optimizer_changes(
            {**state["loop"]["optimizer"], "steps": state["loop"]["schedule"]["steps"]},
            {**optimizer_settings, "steps": steps}, optimizer, scheduler, factor, result.steps, flags)
        for note in result.notes[len(saved.get("notes", [])):]:
            if rank == 0:
                print(note, flush=True)
    if world > 1:
        with torch.no_grad():
            for p in params.values():  # every rank starts from rank 0's values, as DistributedDataParallel does
                torch.distributed.broadcast(p.data, 0)

    def checkpoint() -> None:
        assert checkpoint_path is not None
        weights = ({"model": model.state_dict()} if full_state
                   else {"trainable": {name: p.detach().cpu() for name, p in params.items()}})
        save_checkpoint(checkpoint_path, {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": result.steps, **weights,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
            "data": data.state_dict() if hasattr(data, "state_dict") else None,
            "identity": identity, "config": config,
            "loop": {"schedule": schedule_settings, "optimizer": optimizer_settings},
            "metrics": {"history": result.history, "evals": result.evals, "tokens": result.tokens,
                        "wall_time_s": result.wall_time_s, "notes": result.notes},
        })

    from tqdm.auto import tqdm

    was_training = model.training
    model.train()
    clock = time.perf_counter()
    wall_before = result.wall_time_s
    bar = tqdm(total=steps, initial=result.steps, disable=not progress, desc=desc, unit="step", dynamic_ncols=True)
    try:
        while result.steps < stop:
            loss, tokens = step()
            if world > 1:
                loss, tokens = _average_across_ranks(params, loss, tokens, world)
            check_finite_loss(loss, result.steps + 1)
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(list(params.values()), max_grad_norm)
            used_lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.steps += 1
            result.tokens += tokens
            result.wall_time_s = wall_before + time.perf_counter() - clock
            result.history.append({"step": result.steps, "tokens": result.tokens, "train_loss": loss,
                                   "lr": used_lr, "wall_time_s": result.wall_time_s})
            postfix = {"loss": f"{loss:.4f}", "lr": f"{used_lr:.2e}"}
            if evaluate is not None and ((eval_every and result.steps % eval_every == 0) or result.steps == steps):
                values = dict(evaluate())
                result.evals.append({"step": result.steps, "tokens": result.tokens, **values})
                postfix.update({k: f"{v:.4g}" for k, v in values.items()})
            bar.set_postfix(postfix)
            bar.update(1)
            if checkpoint_path is not None and (
                (checkpoint_every and result.steps % checkpoint_every == 0) or result.steps == stop
            ):
                checkpoint()
    finally:
        bar.close()
        model.train(was_training)
    result.seconds = time.perf_counter() - clock
    result.wall_time_s = wall_before + result.seconds
    return result
