"""``fxsparse tune``: pre-autotune every kernel shape of a transformed model, or empty the kernel cache.

The command transforms a model with a recipe and runs one forward and backward pass on a random batch
of each requested token count (and dtype): every fxsparse op on the way picks its launch config through
:func:`fxsparse.codegen.autotune.pick_config`, which times the candidates of each new shape on the GPU and
stores the winner under ``$FXSPARSE_CACHE_DIR/kernels``, so training runs later start with every shape
tuned. It then prints one row per kernel specialisation (kernel, shape key, config, time, tuned or read
from disk). Nothing here knows the kernels: a kernel shows up because it called ``pick_config``.

    fxsparse tune --model 60m --recipe sltrain --support block --tokens 2048 4096
    fxsparse tune --model smollm2 --recipe s2ft
    fxsparse tune --clear

Where there is nothing to tune it says so and exits 0: on a machine with no CUDA device the ops run as
plain torch (unless ``TRITON_INTERPRET=1``: then the Triton kernels run in the CPU interpreter, nothing
is timed, and the first candidate of each shape is stored, as in the tests).

>>> from fxsparse.codegen.autotune import Config, TuneRecord
>>> print(format_table([TuneRecord("toy", {"M": "64"}, Config({"BLOCK": 32}), 0.0123, "tuned")]))
kernel  shape  config          ms     source
------  -----  --------------  -----  ------
toy     M=64   BLOCK=32 w4 s2  0.012  tuned
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["DTYPES", "add_arguments", "format_table", "tune_model", "run"]

DTYPES = {"fp32": None, "bf16": torch.bfloat16}

# Pre-training presets need a vocabulary size to build their embeddings; the SmolLM2 tokenizer's is the one
# `fxsparse pretrain` uses. The embeddings and LM head stay dense, so this does not change any kernel shape.
_PRETRAIN_VOCAB = 49152


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``fxsparse tune`` (cli.py registers the subcommand)."""
    p.add_argument("--model", default=None,
                   help="smollm2 (default), a tiny preset (tiny-llama...), a pretrain preset (9m...1b) or a folder")
    p.add_argument("--recipe", default="s2ft", choices=("s2ft", "sltrain", "lowrank"))
    p.add_argument("--support", default=None, choices=("random", "block"),
                   help="sltrain: sparse support (default: the recipe's, random)")
    p.add_argument("--rank", type=int, default=None, help="sltrain/lowrank: rank (default width/4)")
    p.add_argument("--sparsity", type=float, default=None,
                   help="sltrain: density of the sparse part (default: the recipe's, 0.03)")
    p.add_argument("--block-size", type=int, default=None,
                   help="sltrain block support: block edge (default: the recipe's, 32)")
    p.add_argument("--ratios", default=None,
                   help="s2ft: trained fraction per projection, e.g. o=0.05,down=0.02 (default: the recipe's)")
    p.add_argument("--tokens", type=int, nargs="+", default=[2048],
                   help="tokens per batch to tune for, one or more")
    p.add_argument("--seq-len", type=int, default=None,
                   help="sequence length (default: the longest divisor of --tokens the model allows)")
    p.add_argument("--dtype", nargs="+", default=None, choices=tuple(DTYPES),
                   help="fp32 and/or bf16 (autocast) (default: both on CUDA, fp32 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clear", action="store_true", help="empty the kernel cache (before tuning, if --model)")
    return p


def format_table(records: Sequence[Any]) -> str:
    """A fixed-width table of :class:`~fxsparse.codegen.autotune.TuneRecord` rows."""
    rows = [("kernel", "shape", "config", "ms", "source")]
    for r in records:
        shape = " ".join(f"{k}={v}" for k, v in r.key.items())
        if r.best_ms is not None:
            ms = f"{r.best_ms:.3f}"
        else:
            ms = "n/a (interpreter)" if _interpreting() else "n/a"
        rows.append((r.kernel, shape, r.config.describe(), ms, "disk" if r.from_disk else "tuned"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _interpreting() -> bool:
    from fxsparse.codegen.autotune import interpreting

    return interpreting()


def _batch_shape(tokens: int, seq_len: int | None, max_positions: int | None) -> tuple[int, int]:
    if tokens <= 0:
        raise ValueError(f"--tokens must be positive, got {tokens}")
    if seq_len is None:
        limit = min(tokens, max_positions or tokens)
        seq_len = max(d for d in range(1, limit + 1) if tokens % d == 0)
    elif seq_len <= 0 or tokens % seq_len:
        raise ValueError(f"--seq-len {seq_len} must be positive and divide --tokens {tokens}")
    return tokens // seq_len, seq_len


def tune_model(model: nn.Module, tokens: Sequence[int] = (2048,), dtypes: Sequence[str] = ("fp32",),
               seq_len: int | None = None, seed: int = 0) -> list[Any]:
    """Run one forward + backward of the (transformed) ``model`` per token count and dtype on random token
    ids, on the model's device; returns the distinct kernel specialisations picked on the way.

    Leaves the model's gradients cleared. Under ``fp32`` the model runs as it is; under ``bf16`` inside
    ``torch.autocast`` (fp32 weights), as ``fxsparse pretrain --dtype bf16`` does.
    """
    from fxsparse.codegen.autotune import record_picks

    device = next(model.parameters()).device
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab is None:
        raise ValueError("tune_model needs a causal LM with config.vocab_size")
    max_positions = getattr(config, "max_position_embeddings", None)
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.train()
    picked: dict[tuple[str, tuple], Any] = {}
    try:
        for count in tokens:
            batch, length = _batch_shape(count, seq_len, max_positions)
            ids = torch.randint(0, vocab, (batch, length), generator=generator).to(device)
            for name in dtypes:
                if name not in DTYPES:
                    raise ValueError(f"unknown dtype {name!r}; choose from {list(DTYPES)}")
                autocast = torch.autocast(device.type, dtype=DTYPES[name], enabled=DTYPES[name] is not None)
                with record_picks() as records, autocast:
                    loss = model(input_ids=ids, labels=ids).loss
                    loss.backward()
                model.zero_grad(set_to_none=True)
                for r in records:
                    picked.setdefault((r.kernel, tuple(r.key.items())), r)
    finally:
        model.train(was_training)
    return list(picked.values())


def _load(args: argparse.Namespace) -> nn.Module:
    from fxsparse.app.models import load_model

    try:
        from fxsparse.app.pretrain import PRESETS, build_model
    except ImportError:
        PRESETS, build_model = {}, None
    name = args.model or "smollm2"
    if name in PRESETS:
        return build_model(PRESETS[name], _PRETRAIN_VOCAB, max(args.seq_len or 0, max(args.tokens), 2048), args.seed)
    model, _ = load_model(name)
    return model


def _recipe_options(args: argparse.Namespace) -> dict[str, Any]:
    given = {"support": args.support, "rank": args.rank, "sparsity": args.sparsity, "block_size": args.block_size}
    options: dict[str, Any] = {"seed": args.seed}
    if args.recipe == "s2ft":
        extra = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None]
        if extra:
            raise ValueError(f"{', '.join(extra)} apply to sltrain/lowrank, not to recipe s2ft")
        if args.ratios is not None:
            from fxsparse.app.finetune import parse_ratios

            options["ratios"] = parse_ratios(args.ratios)
        return options
    if args.ratios is not None:
        raise ValueError(f"--ratios applies to s2ft, not to recipe {args.recipe}")
    if args.recipe == "lowrank":
        extra = [f"--{k.replace('_', '-')}" for k in ("support", "sparsity", "block_size") if given[k] is not None]
        if extra:
            raise ValueError(f"{', '.join(extra)} apply to sltrain, not to recipe lowrank (no sparse part)")
    options.update({k: v for k, v in given.items() if v is not None})
    return options


def _check_values(args: argparse.Namespace, options: dict[str, Any]) -> None:
    """Option values checked before any model loads: the recipe's own config validation, token counts."""
    from fxsparse.recipes import resolve_recipe

    resolve_recipe(args.recipe, options)  # a ValueError naming the bad value (rank, sparsity, block_size, ratios)
    for count in args.tokens:
        if count <= 0:
            raise ValueError(f"--tokens must be positive, got {count}")
    if args.seq_len is not None and args.seq_len <= 0:
        raise ValueError(f"--seq-len must be positive, got {args.seq_len}")


def _reinit_note(args: argparse.Namespace) -> str | None:
    """For sltrain/lowrank on a model with trained weights: say that the recipe draws every projection anew."""
    name = args.model or "smollm2"
    if args.recipe == "s2ft" or name.startswith("tiny-"):
        return None
    try:
        from fxsparse.app.pretrain import PRESETS
    except ImportError:
        PRESETS = {}
    if name in PRESETS:
        return None
    return (f"note: {args.recipe} re-initialises every attention and FFN projection of {name} (W = B @ A * scale"
            f"{' + S' if args.recipe == 'sltrain' else ''}, drawn from scratch): its trained weights are not kept. "
            "Tuning only needs the shapes; to fine-tune a trained model, use recipe s2ft.")


@contextlib.contextmanager
def _kernels_env(mode: str | None) -> Iterator[None]:
    """Set ``FXSPARSE_KERNELS`` for the block (it is read at every op call) and restore it after."""
    old = os.environ.get("FXSPARSE_KERNELS")
    if mode is not None:
        os.environ["FXSPARSE_KERNELS"] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FXSPARSE_KERNELS", None)
        else:
            os.environ["FXSPARSE_KERNELS"] = old


def _nothing_to_tune() -> str | None:
    """Why nothing can be tuned on this machine, or None (also validates ``FXSPARSE_KERNELS``)."""
    from fxsparse.codegen.autotune import interpreting, kernels_mode, triton_available

    mode = kernels_mode()
    if mode == "torch":
        return "FXSPARSE_KERNELS=torch: every op runs as plain torch, nothing to tune"
    if not triton_available():
        return "triton is not installed: every op runs as plain torch, nothing to tune"
    if not torch.cuda.is_available() and not interpreting():
        return ("no CUDA device here (and TRITON_INTERPRET is not 1): the kernels run as plain torch ops on "
                "this machine, so nothing is tuned. Run `fxsparse tune` on the GPU machine that will train.")
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``fxsparse tune``: clear the cache (``--clear``) and/or tune the shapes of ``--model``."""
    from fxsparse.codegen import cache

    result: dict[str, Any] = {"records": [], "tuned": 0, "from_disk": 0}
    if args.clear:
        result["removed"] = cache.clear_cache()
        print(f"removed {result['removed']} kernel-cache entries from {cache.cache_dir()}")
        if args.model is None:
            return result
    options = _recipe_options(args)
    _check_values(args, options)
    reason = _nothing_to_tune()
    if reason is not None:
        print(reason)
        result["reason"] = reason
        return result
    import fxsparse

    on_cuda = torch.cuda.is_available() and not _interpreting()
    dtypes = args.dtype or (["fp32", "bf16"] if on_cuda else ["fp32"])
    note = _reinit_note(args)
    if note:
        print(note)
    model = fxsparse.transform(_load(args), recipe=args.recipe, **options)
    model = model.to("cuda" if on_cuda else "cpu")
    if not on_cuda:
        print("CPU with TRITON_INTERPRET=1: the Triton kernels run in the interpreter; nothing is timed, the "
              "first candidate of each shape is stored")
    before = cache.cache_stats()
    # On CPU, `auto` would run plain torch: tuning is about the Triton kernels, so ask for them explicitly.
    with _kernels_env(None if on_cuda else "triton"):
        records = tune_model(model, args.tokens, dtypes, args.seq_len, args.seed)
    after = cache.cache_stats()
    result.update(records=records, tuned=after["tuned"] - before["tuned"],
                  from_disk=sum(r.from_disk for r in records))
    if not records:
        print(f"no kernel went through the autotuner: the layers of recipe {args.recipe!r} ran no Triton kernel")
        return result
    print(format_table(sorted(records, key=lambda r: r.kernel)))  # stable: each kernel's shapes in run order
    print(f"{len(records)} kernel shapes: {result['tuned']} tuned now, {result['from_disk']} from disk "
          f"(cache: {cache.cache_dir()}; tokens {', '.join(map(str, args.tokens))}; dtypes {', '.join(dtypes)})")
    return result
