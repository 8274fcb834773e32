"""The ``fxsparse finetune`` and ``fxsparse demo`` commands.

``finetune`` loads a model (``smollm2``, a tiny preset or a local folder), transforms it with S²FT (or
trains it fully), fine-tunes it on a built-in task or a JSONL file of prompt/response pairs, and writes to
``--out``: ``adapter/`` (``fxsparse.save_adapter``), ``loss.png``, ``metrics.json`` and resumable
checkpoints under ``checkpoints/``. Exact-match accuracy on the held-out split is printed before and after.

    fxsparse finetune --model smollm2 --task add --ratios o=0.1,down=0.1 --steps 30 --out runs/add
    fxsparse finetune --model smollm2 --data pairs.jsonl --steps 200 --out runs/mine --resume
    fxsparse demo

>>> import argparse
>>> sub = argparse.ArgumentParser().add_subparsers()
>>> parser = add_parser(sub)
>>> parse_ratios("o=0.05,down=0.02")
{'o': 0.05, 'down': 0.02}
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path
from typing import Any

import torch

from fxsparse.plan import ROLES as _ROLES
from fxsparse.plan import check_ratios

__all__ = ["add_parser", "run", "run_demo", "parse_ratios", "parse_layers", "DEMO_SETTINGS"]


# The demo: SmolLM2-135M-Instruct answers "What is 37 + 48?" in prose ("To add 50 and 72, ...") and so
# scores 0% exact match on 100 held-out sums; 12 S²FT steps of 16 examples teach it to answer with the
# number. Measured on 2 shared CPU cores (12 steps, batch 16, held-out 0% before):
#   all 30 blocks, lr 1e-3: 54% after, 229 CPU-s of training;  lr 2e-3: 42% (loss spike at step 3)
#   blocks 10-29,  lr 2e-3: 51% after, 131 CPU-s (backward stops at block 10)
#   blocks 20-29,  lr 2e-3:  7% after (answers in the right format, wrong sums)
# Every other built-in task also starts at 0% (prose answers).
DEMO_SETTINGS: dict[str, Any] = {
    "model": "smollm2",
    "task": "add",
    "ratios": "o=0.1,down=0.1,v=0.1,up=0.1",
    "layers": "10-29",
    "select": "random",
    "recipe": "s2ft",
    "lr": 2e-3,
    "steps": 12,
    "batch_size": 16,
    "grad_accum": 1,
    "warmup": 2,
    "eval_n": 100,
}


def parse_ratios(text: str) -> dict[str, float]:
    """``"o=0.05,down=0.02"`` -> ``{"o": 0.05, "down": 0.02}``; a bad item raises ``ValueError`` naming it."""
    ratios: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        role, sep, value = item.partition("=")
        role = role.strip()
        if not sep or role not in _ROLES:
            raise ValueError(f"bad ratio {item!r} in --ratios: expected ROLE=FRACTION with ROLE in {list(_ROLES)}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"bad ratio {item!r} in --ratios: {value.strip()!r} is not a number") from None
        try:
            ratios.update(check_ratios({role: number}))
        except ValueError as err:
            raise ValueError(f"bad ratio {item!r} in --ratios: {err}") from None
    if not ratios:
        raise ValueError(f"--ratios {text!r} names no projection")
    return ratios


def parse_layers(text: str) -> list[int]:
    """``"0,4-6"`` -> ``[0, 4, 5, 6]``; a bad item raises ``ValueError`` naming it.

    >>> parse_layers("20-22,29")
    [20, 21, 22, 29]
    """
    layers: list[int] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        lo, sep, hi = item.partition("-")
        try:
            first, last = int(lo), int(hi if sep else lo)
        except ValueError:
            raise ValueError(f"bad layer {item!r} in --layers: expected N or N-M") from None
        if first < 0 or last < first:
            raise ValueError(f"bad layer range {item!r} in --layers")
        layers.extend(range(first, last + 1))
    if not layers:
        raise ValueError(f"--layers {text!r} names no layer")
    return sorted(set(layers))


def _add_training_options(p: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    p.add_argument("--model", default=defaults["model"], help="smollm2, a tiny preset (tiny-llama) or a folder")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--task", default=None,
                        help=f"built-in task (default {defaults['task']!r}); see --list-tasks")
    source.add_argument("--data", default=None, help='JSONL file, one {"prompt": ..., "response": ...} per line')
    p.add_argument("--list-tasks", action="store_true", help="print the built-in tasks and exit")
    p.add_argument("--recipe", choices=["s2ft", "full"], default=defaults["recipe"], type=_finetune_recipe,
                   help="s2ft (structured sparse) or full fine-tuning")
    p.add_argument("--ratios", default=defaults["ratios"],
                   help="S2FT fractions per projection, e.g. o=0.05,down=0.02")
    p.add_argument("--layers", default=defaults.get("layers"),
                   help="S2FT: blocks that may get trainable units, e.g. 20-29; backward stops below the lowest one, "
                        "so upper blocks only train faster (default: "
                        + (defaults.get("layers") or "all blocks") + ")")
    p.add_argument("--select", default=defaults["select"], choices=["random", "weight", "activation", "gradient"],
                   help="how S2FT picks heads/channels (activation/gradient use two training batches)")
    p.add_argument("--lr", type=float, default=defaults["lr"])
    p.add_argument("--steps", type=int, default=defaults["steps"], help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=defaults["batch_size"], help="examples per micro-batch")
    p.add_argument("--grad-accum", type=int, default=defaults["grad_accum"], help="micro-batches per step")
    p.add_argument("--warmup", type=int, default=defaults["warmup"], help="linear warm-up steps")
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    p.add_argument("--seq-len", type=int, default=256, help="longest training sequence (prompt cut from the left)")
    p.add_argument("--train-n", type=int, default=2000, help="training examples generated for a built-in task")
    p.add_argument("--eval-n", type=int, default=defaults["eval_n"], help="held-out examples for exact match")
    p.add_argument("--eval-batch-size", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 for torch's choice")
    p.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every N steps (always at the end)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="start from step 0 even if OUT holds an earlier run, replacing it (finetune: without "
                        "this or --resume, an earlier run in OUT is an error; demo replaces it anyway)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--compile", nargs="?", const="fxsparse", default=None, choices=["fxsparse", "inductor"],
                   help="train under torch.compile with this backend, evaluation stays eager; --compile "
                        "alone means fxsparse (default: off)")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``finetune`` and ``demo`` on ``subparsers``; returns the ``finetune`` parser."""
    p = subparsers.add_parser("finetune", help="fine-tune a model with S2FT on a built-in task or a JSONL file",
                              description=__doc__.split("\n\n")[1])
    _add_training_options(p, DEMO_SETTINGS | {"steps": 100, "ratios": "o=0.052,down=0.02", "warmup": 10,
                                              "layers": None})
    p.add_argument("--out", default="runs/finetune", help="output folder")
    p.set_defaults(func=run)

    d = subparsers.add_parser("demo", help="fine-tune SmolLM2-135M with S2FT on two-digit addition (minutes, CPU)")
    _add_training_options(d, DEMO_SETTINGS)
    d.add_argument("--out", default="runs/demo",
                   help="output folder; unlike finetune, a second demo replaces an earlier run there (with a "
                        "notice) unless --resume is given")
    d.set_defaults(func=run_demo)
    return p


def _load(model_name: str):
    from fxsparse.app.data import CharTokenizer
    from fxsparse.app.models import load_model

    model, tokenizer = load_model(model_name)
    if tokenizer is None:
        # tiny presets ship no tokenizer: characters are enough for the built-in tasks
        tokenizer = CharTokenizer()
        vocab = model.get_input_embeddings().num_embeddings
        if tokenizer.vocab_size > vocab:
            raise ValueError(f"model {model_name!r} has no tokenizer and a vocabulary of {vocab} < "
                             f"{tokenizer.vocab_size} needed by the character-level fallback")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _examples(args):
    from fxsparse.app.data import TASKS, load_jsonl, task_splits

    if args.data:
        examples = load_jsonl(args.data)
        if args.eval_n >= len(examples):
            raise ValueError(
                f"--eval-n {args.eval_n} leaves no training examples out of {len(examples)} in {args.data}"
            )
        order = list(range(len(examples)))
        random.Random(args.seed).shuffle(order)
        heldout = [examples[i] for i in order[: args.eval_n]]
        train = [examples[i] for i in order[args.eval_n :]]
        return train, heldout, f"file {args.data}"
    task = args.task or DEMO_SETTINGS["task"]
    train, heldout = task_splits(task, args.train_n, args.eval_n, seed=args.seed)
    return train, heldout, f"task {task!r}: {TASKS[task][0]}"


# How a setting that differs from the checkpoint's is named when a resume refuses (or applies) it.
_FLAGS = {"model": "--model", "recipe": "--recipe", "ratios": "--ratios", "select": "--select", "layers": "--layers",
          "plan": "--ratios/--select/--layers/--seed", "seed": "--seed", "data": "--task/--data",
          "train_n": "--train-n", "eval_n": "--eval-n", "batch_size": "--batch-size", "seq_len": "--seq-len",
          "steps": "--steps", "warmup_steps": "--warmup", "schedule": "--schedule", "lr": "--lr"}

# files that mark an earlier run in --out (refused unless --resume or --overwrite)
_RUN_OUTPUTS = ("checkpoints/last.pt", "metrics.json")


def _finetune_recipe(value: str) -> str:
    """``--recipe`` type: a pre-training recipe named here gets an explanation, not just "invalid choice"."""
    if value in ("sltrain", "lowrank"):
        raise argparse.ArgumentTypeError(
            f"{value} is a pre-training recipe: it re-initialises every projection (W = B @ A * scale"
            f"{' + S' if value == 'sltrain' else ''}, drawn from scratch), which would throw away the model's "
            "trained weights. Fine-tune with --recipe s2ft or full; pre-train with `fxsparse pretrain "
            f"--recipe {value}`")
    return value


# Blocks of the SmolLM2-135M default model (its config.json: num_hidden_layers).
_SMOLLM2_BLOCKS = 30


def _model_depth(name: str) -> int | None:
    """How many blocks model ``name`` has, read without loading it; None when it cannot be told cheaply."""
    from fxsparse.app.models import DEFAULT_MODEL
    from fxsparse.models import TINY_ARCHS, tiny_config

    if name == DEFAULT_MODEL:
        return _SMOLLM2_BLOCKS
    if name.startswith("tiny-") and name[5:] in TINY_ARCHS:
        return int(tiny_config(name[5:]).num_hidden_layers)
    config_file = Path(name) / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    depth = config.get("num_hidden_layers", config.get("n_layer"))
    return depth if isinstance(depth, int) else None


def _check_args(args) -> None:
    # values are checked here, before the model loads and the held-out evaluation runs (minutes on SmolLM2)
    _check_values_before_loading(args)
    for name in ("steps", "batch_size", "grad_accum", "eval_batch_size", "seq_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("eval_n", "warmup", "threads", "checkpoint_every", "train_n"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    # fail before the minutes of loading and evaluating, not after
    if args.recipe == "s2ft":
        parse_ratios(args.ratios)
        if args.layers:
            parse_layers(args.layers)


def _check_values_before_loading(args) -> None:
    """Value checks that need the data file or the model's depth (read cheaply); warnings for odd settings."""
    import sys

    if args.recipe == "s2ft" and args.layers:
        layers, depth = parse_layers(args.layers), _model_depth(args.model)
        if depth is not None and layers[-1] >= depth:
            raise ValueError(f"--layers {args.layers} names block {layers[-1]}, but {args.model} has {depth} "
                             f"blocks, numbered 0-{depth - 1}")
    if args.data and args.eval_n >= 0 and not args.list_tasks:
        from fxsparse.app.data import check_eval_n, load_jsonl

        check_eval_n(args.eval_n, len(load_jsonl(args.data)), args.data)
    if 0 < args.steps < args.warmup:
        print(f"warning: the warm-up (--warmup {args.warmup}) is longer than the run (--steps {args.steps}): the "
              f"learning rate only climbs to {args.steps / args.warmup:.0%} of --lr {args.lr:g} and never "
              f"decays; pass --warmup {max(0, args.steps // 10)} or fewer", file=sys.stderr, flush=True)


def _evaluate(model, tokenizer, heldout, args, label: str) -> tuple[float | None, list[str]]:
    from fxsparse.app.data import exact_match

    if not heldout:
        return None, []
    start = time.perf_counter()
    accuracy, answers = exact_match(model, tokenizer, heldout, batch_size=args.eval_batch_size)
    print(f"exact match {label}: {accuracy:.1%} on {len(heldout)} held-out prompts "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    for example, answer in list(zip(heldout, answers, strict=True))[:3]:
        print(f"    {example.prompt!r} -> {answer!r} (expected {example.response!r})")
    return accuracy, answers


def _check_fits_model(model, encoded, args) -> None:
    """Token ids inside the model's vocabulary and sequences within its positions, before anything trains.

    A tokenizer with more ids than the model's embedding (a folder whose tokenizer gained tokens) or a
    sequence longer than learned position embeddings (GPT-2's 1024) would otherwise stop with a raw
    ``IndexError`` deep in the forward pass.
    """
    vocab = model.get_input_embeddings().num_embeddings
    top = max((max(e.prompt_ids + e.response_ids) for e in encoded if e.prompt_ids + e.response_ids), default=-1)
    if top >= vocab:
        raise ValueError(f"the tokenizer of --model {args.model!r} produced token id {top}, outside the model's "
                         f"vocabulary of {vocab} (ids 0-{vocab - 1}): use the tokenizer the model was trained with")
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    longest = max((len(e.prompt_ids) + len(e.response_ids) for e in encoded), default=0)
    if isinstance(positions, int) and longest > positions:
        raise ValueError(f"--seq-len {args.seq_len} lets sequences of {longest} tokens through, but model "
                         f"{args.model!r} has {positions} positions: pass --seq-len {positions} or less")


def _transform(model, tokenizer, train_examples, args) -> tuple[Any, dict[str, float] | None]:
    import fxsparse

    if args.recipe == "full":
        model.requires_grad_(True)
        return model, None
    ratios = parse_ratios(args.ratios)
    options: dict[str, Any] = {"ratios": ratios, "select": args.select, "seed": args.seed}
    if args.layers:
        options["layers"] = parse_layers(args.layers)
    if args.select in ("activation", "gradient"):
        from fxsparse.app.data import collate, encode_examples

        encoded = encode_examples(tokenizer, train_examples[: 2 * args.batch_size], args.seq_len)
        options["calibration"] = [collate(encoded[i : i + args.batch_size], tokenizer.pad_token_id)
                                  for i in range(0, len(encoded), args.batch_size)]
    return fxsparse.transform(model, recipe="s2ft", **options), ratios


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``fxsparse finetune`` with parsed ``args``; returns the metrics also written to metrics.json."""
    import fxsparse
    from fxsparse.app.data import TASKS, BatchStream, encode_examples
    from fxsparse.app.loop import check_out_dir, command_line, init_distributed, plot_curves, write_text_atomic
    from fxsparse.app.train import train

    if args.list_tasks:
        for name, (description, _) in TASKS.items():
            print(f"{name:14s} {description}")
        return {"tasks": sorted(TASKS)}
    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    checkpoint_dir = out / "checkpoints"
    check_out_dir(out, _RUN_OUTPUTS, args.resume, getattr(args, "overwrite", False))
    if args.resume and not (checkpoint_dir / "last.pt").is_file():
        raise ValueError(f"--resume: no checkpoint at {checkpoint_dir / 'last.pt'}")
    out.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()

    train_examples, heldout, source = _examples(args)
    print(f"data: {source}; {len(train_examples)} training / {len(heldout)} held-out examples", flush=True)
    print(f"model: {args.model}", flush=True)
    model, tokenizer = _load(args.model)
    encoded = encode_examples(tokenizer, train_examples, args.seq_len)
    _check_fits_model(model, encoded + encode_examples(tokenizer, heldout, args.seq_len), args)
    if torch.cuda.is_available():
        model.cuda()
    before, _ = _evaluate(model, tokenizer, heldout, args, "before")

    # counted before the transform: the transformed model also holds the trainable blocks beside the frozen
    # weights, and the base model's size is what "fraction trained" is meant against
    total = sum(p.numel() for p in model.parameters())
    model, ratios = _transform(model, tokenizer, train_examples, args)
    trainable = sum(p.numel() for p in fxsparse.trainable_parameters(model))
    print(f"recipe: {args.recipe}" + (f" ratios={ratios} select={args.select} layers={args.layers or 'all'}"
                                      if ratios else ""))
    print(f"trainable parameters: {trainable:,} of {total:,} in the base model ({100 * trainable / total:.3f}%)",
          flush=True)

    rank, world = init_distributed()  # under torchrun: each rank its own batches, gradients averaged
    stream = BatchStream(encoded, args.batch_size, tokenizer.pad_token_id, seed=args.seed + rank)
    if getattr(args, "compile", None):
        from fxsparse.compile import compile_module

        compile_module(model, backend=args.compile)  # in place: parameter names and checkpoints unchanged
    result = train(
        model, stream, steps=args.steps, lr=args.lr, grad_accum=args.grad_accum, warmup_steps=args.warmup,
        schedule=args.schedule, checkpoint_dir=checkpoint_dir, checkpoint_every=args.checkpoint_every,
        resume=args.resume, progress=not args.no_progress, model_name=args.model, flags=_FLAGS,
        config={"model": args.model, "recipe": args.recipe, "ratios": ratios, "select": args.select if ratios else None,
                "layers": parse_layers(args.layers) if ratios and args.layers else None, "seed": args.seed,
                "data": source, "train_n": args.train_n, "eval_n": args.eval_n, "batch_size": args.batch_size,
                "seq_len": args.seq_len},
    )
    if getattr(args, "compile", None):
        from fxsparse.compile import uncompile_module

        uncompile_module(model)  # generate() below varies its shapes every token: eager is faster there
    print(f"trained {result.steps - result.resumed_from} steps in {result.seconds:.0f} s "
          f"(loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f})", flush=True)
    if rank != 0:
        return {"rank": rank, "world_size": world, "steps": result.steps}  # rank 0 evaluates, writes and reports
    after, answers = _evaluate(model, tokenizer, heldout, args, "after")

    if args.recipe == "s2ft":
        fxsparse.save_adapter(model, out / "adapter")
        saved = out / "adapter"
    else:
        model.save_pretrained(out / "model")
        saved = out / "model"
    plot_curves(out / "loss.png", result.history, title=f"{args.model} {args.recipe} on {source.split(':')[0]}",
                loss_label="mean response-token loss")
    metrics = {
        "model": args.model,
        "data": source,
        "recipe": args.recipe,
        "compile": getattr(args, "compile", None),
        "ratios": ratios,
        "select": args.select if ratios else None,
        "layers": parse_layers(args.layers) if ratios and args.layers else None,
        "trainable_params": trainable,
        "total_params": total,
        "train_examples": len(train_examples),
        "heldout_examples": len(heldout),
        "exact_match_before": before,
        "exact_match_after": after,
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "lr": args.lr,
        "warmup": args.warmup,
        "schedule": args.schedule,
        "resume_notes": result.notes,
        "seed": args.seed,
        "world_size": world,
        "losses": result.losses,
        "lrs": result.lrs,
        "train_tokens": result.tokens,
        "train_seconds": result.seconds,
        "wall_seconds": time.perf_counter() - wall,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "heldout_answers": answers[:20],
    }
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    if before is not None:
        print(f"exact match: {before:.1%} before -> {after:.1%} after")
    print(f"trainable parameters: {trainable:,} of {total:,} in the base model ({100 * trainable / total:.3f}%)")
    print(f"wrote {saved}, {out / 'loss.png'}, {out / 'metrics.json'}, {checkpoint_dir / 'last.pt'} "
          f"({metrics['wall_seconds']:.0f} s in all)")
    longer = command_line(add_parser, getattr(args, "command", None) or "finetune", args, steps=2 * args.steps)
    print(f"train longer: {longer} --resume")
    return metrics


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """``fxsparse demo``: :func:`run` with :data:`DEMO_SETTINGS` (each can still be overridden)."""
    print("fxsparse demo: S2FT fine-tuning of SmolLM2-135M-Instruct on two-digit addition, on this CPU")
    # a newcomer runs `make demo` twice: replace the demo's own earlier output rather than refuse
    earlier = any((Path(args.out) / name).exists() for name in _RUN_OUTPUTS)
    if earlier and not args.resume and not args.overwrite:
        print(f"note: replacing the earlier demo run in {args.out} (pass --resume to continue it instead)")
        args.overwrite = True
    return run(args)
