"""Pre-training from scratch: LLaMA presets, a resumable training loop and the ``fxsparse pretrain`` command.

A model of a preset size (or a JSON config) is built with random weights, optionally re-parameterised
with SLTrain (``W = B @ A * alpha / r + S``, sparse ``S`` on a fixed random or block support) or with a
low-rank-only baseline, and trained on a text corpus tokenised with the SmolLM2 tokenizer: AdamW, cosine
schedule with linear warm-up, gradient accumulation, fp32 or bf16 autocast, periodic held-out
perplexity, and checkpoints that resume exactly (model, optimizer, scheduler, RNG and data position).
The low-rank-only baseline gets a random ``B`` as well as ``A`` (see :func:`apply_recipe`): from
scratch, ``B = 0`` with no sparse part is a saddle where no block ever receives a gradient.

Preset names follow the papers (GaLore, SLTrain), which count parameters with LLaMA's 32 000-token
vocabulary and untied input/output embeddings; with SmolLM2's 49 152 tokens each model is larger by
``2 * 17 152 * hidden`` embedding parameters. The 60M...1B rows are the papers' table; 9M, 20M and 35M
are ours, chosen to land near their names under the same convention:

======  ======  =====  ======  =====
preset  hidden  FFN    layers  heads
======  ======  =====  ======  =====
9m      128     352    4       4
20m     256     688    4       4
35m     384     1024   6       6
60m     512     1376   8       8
130m    768     2048   12      12
350m    1024    2736   24      16
1b      2048    5461   24      32
======  ======  =====  ======  =====

>>> PRESETS["60m"].param_count(vocab_size=32000) // 10**6
58
>>> import argparse
>>> parser = argparse.ArgumentParser(); sub = parser.add_subparsers()
>>> add_parser(sub).parse_args(["--preset", "9m", "--recipe", "dense"]).recipe
'dense'
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "Preset",
    "PRESETS",
    "RECIPES",
    "TrainBatches",
    "build_model",
    "apply_recipe",
    "recipe_options",
    "parse_args",
    "preset_from_config",
    "export_hf",
    "evaluate",
    "accumulate_gradients",
    "add_parser",
    "run",
]

RECIPES = ("sltrain", "lowrank", "dense")
CHECKPOINT_NAME = "checkpoint.pt"


@dataclass(frozen=True)
class Preset:
    """Size of a LLaMA decoder: hidden width, FFN width, blocks and attention heads (plain MHA).

    >>> Preset("x", 64, 160, 2, 4).head_dim
    16
    """

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int

    def __post_init__(self) -> None:
        for field in ("hidden_size", "intermediate_size", "num_layers", "num_heads"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"preset {self.name!r}: {field} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"preset {self.name!r}: hidden_size {self.hidden_size} is not divisible by "
                f"num_heads {self.num_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def param_count(self, vocab_size: int) -> int:
        """Parameters of the dense model: untied embeddings, 4 attention + 3 FFN linears, 2 norms a block."""
        h, f = self.hidden_size, self.intermediate_size
        block = 4 * h * h + 3 * h * f + 2 * h
        return 2 * vocab_size * h + self.num_layers * block + h

    def llama_config(self, vocab_size: int, max_positions: int, eos_token_id: int | None = None):
        """The transformers ``LlamaConfig`` of this size."""
        from transformers import LlamaConfig

        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads,
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
            eos_token_id=eos_token_id,
            bos_token_id=None,
            pad_token_id=None,
        )
        config._attn_implementation = "sdpa"
        return config


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("9m", 128, 352, 4, 4),
        Preset("20m", 256, 688, 4, 4),
        Preset("35m", 384, 1024, 6, 6),
        Preset("60m", 512, 1376, 8, 8),
        Preset("130m", 768, 2048, 12, 12),
        Preset("350m", 1024, 2736, 24, 16),
        Preset("1b", 2048, 5461, 24, 32),
    )
}


def preset_from_config(path: str | Path) -> Preset:
    """A :class:`Preset` from a JSON file with ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``
    (or ``num_layers``) and ``num_attention_heads`` (or ``num_heads``); a LLaMA ``config.json`` works.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read model config {str(path)!r}: {err}") from None
    aliases = {
        "hidden_size": ("hidden_size",),
        "intermediate_size": ("intermediate_size",),
        "num_layers": ("num_layers", "num_hidden_layers"),
        "num_heads": ("num_heads", "num_attention_heads"),
    }
    values: dict[str, Any] = {}
    for field, names in aliases.items():
        found = [data[n] for n in names if n in data]
        if not found:
            raise ValueError(f"model config {str(path)!r} lacks {' or '.join(names)}")
        values[field] = found[0]
    kv_heads = data.get("num_key_value_heads")
    if kv_heads not in (None, values["num_heads"]):
        raise ValueError(f"model config {str(path)!r}: num_key_value_heads={kv_heads} (only plain MHA is built)")
    return Preset(name=data.get("name", path.stem), **values)


def build_model(preset: Preset, vocab_size: int, max_positions: int, seed: int,
                eos_token_id: int | None = None) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` of size ``preset``, float32, train mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(preset.llama_config(vocab_size, max_positions, eos_token_id))
    return model.train()


def apply_recipe(model: nn.Module, recipe: str, options: dict[str, Any]) -> nn.Module:
    """``dense``: unchanged; ``sltrain`` / ``lowrank``: :func:`fxsparse.transform` with ``options``.
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown pre-training recipe {recipe!r}; choose one of {list(RECIPES)}")
    if recipe == "dense":
        return model
    import fxsparse

    model = fxsparse.transform(model, recipe=recipe, **options)
    return model.train()


def recipe_options(args: argparse.Namespace, preset: Preset) -> dict[str, Any]:
    """The ``fxsparse.transform`` options for ``args.recipe``.

    Rank defaults to hidden/4 (the paper: 128 at 60M, 256 at 350M, 512 at 1B); alpha, when not given, is
    left to the recipe's rule (32 below width 1024, else 16).
    """
    if args.recipe == "dense":
        return {}
    rank = args.rank if args.rank is not None else max(1, preset.hidden_size // 4)
    options: dict[str, Any] = {"rank": rank, "seed": args.seed}
    if args.alpha is not None:
        options["alpha"] = args.alpha
    if args.recipe == "sltrain":
        options.update(sparsity=args.sparsity, support=args.support)
        if args.block_size is not None:
            options["block_size"] = args.block_size
    return options


class TrainBatches:
    """Micro-batches of packed training sequences in a seeded order per epoch; the position is the state.

    The order of epoch ``e`` depends only on ``(seed, e)``, so ``state_dict()`` = (epoch, cursor) is all a
    checkpoint needs to continue with exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, sequences: torch.Tensor, batch_size: int, seed: int):
        if batch_size > len(sequences):
            raise ValueError(f"batch_size {batch_size} exceeds the {len(sequences)} training sequences")
        self.sequences, self.batch_size, self.seed = sequences, batch_size, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.sequences), generator=generator)

    def next(self) -> torch.Tensor:
        if self.cursor + self.batch_size > len(self.sequences):
            # drop the ragged tail so every micro-batch has the same shape and token count
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        rows = self._order[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return self.sequences[rows]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation(self.epoch)


def _eval_batches(sequences: torch.Tensor, batch_size: int, max_batches: int) -> Iterator[torch.Tensor]:
    for index in range(min(max_batches, len(sequences) // batch_size) if max_batches > 0 else 0):
        yield sequences[index * batch_size : (index + 1) * batch_size]


def _autocast(dtype: str):
    return torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16,
                          enabled=dtype == "bf16")


@torch.no_grad()
def evaluate(model: nn.Module, sequences: torch.Tensor, batch_size: int, max_batches: int,
             dtype: str = "fp32") -> float:
    """Mean next-token loss over the first ``max_batches`` held-out micro-batches (0 or fewer: all)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    if max_batches <= 0:
        max_batches = len(sequences) // batch_size
    total, count = 0.0, 0
    for batch in _eval_batches(sequences, batch_size, max_batches):
        batch = batch.to(device)
        with _autocast(dtype):
            loss = model(input_ids=batch, labels=batch).loss
        # every sequence has the same length, so the mean of batch means is the token mean
        total += float(loss)
        count += 1
    model.train(was_training)
    if count == 0:
        raise ValueError(f"held-out split has {len(sequences)} sequences, fewer than one batch of {batch_size}")
    return total / count


def accumulate_gradients(model: nn.Module, micro_batches: list[torch.Tensor], dtype: str = "fp32") -> float:
    """Forward/backward each micro-batch, loss scaled by 1/len so ``.grad`` is the whole batch's mean gradient.

    Returns the mean loss. Equal-length micro-batches make this the gradient of one big batch.
    """
    total = 0.0
    for batch in micro_batches:
        with _autocast(dtype):
            loss = model(input_ids=batch, labels=batch).loss / len(micro_batches)
        loss.backward()
        total += float(loss.detach())
    return total


def _load_tokenizer(name: str):
    if name == "bytes":
        from fxsparse.app.corpus import ByteTokenizer

        return ByteTokenizer()
    if name != "smollm2":
        raise ValueError(f"unknown tokenizer {name!r}; choose 'smollm2' or 'bytes'")
    from fxsparse.app.models import load_default_tokenizer

    # from the converted checkpoint the default model is cached as: no 4 s GGUF tokenizer parse per command
    return load_default_tokenizer()


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``pretrain`` subcommand to ``subparsers``; returns its parser (``run`` is its handler)."""
    p = subparsers.add_parser(
        "pretrain",
        help="pre-train a LLaMA from scratch with SLTrain, low-rank or dense weights",
        description=__doc__.split("\n\n")[0],
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--preset", default="60m", help=f"model size: {', '.join(PRESETS)}")
    size.add_argument("--config", help="JSON file with hidden_size, intermediate_size, num_hidden_layers, "
                                       "num_attention_heads (instead of --preset)")
    p.add_argument("--recipe", default="sltrain", choices=RECIPES)
    p.add_argument("--rank", type=int, default=None, help="low-rank factor rank (default hidden/4)")
    p.add_argument("--sparsity", type=float, default=0.03, help="SLTrain: density of the sparse part")
    p.add_argument("--alpha", type=float, default=None,
                   help="low-rank scale is alpha/rank (default: 32 below hidden 1024, else 16)")
    p.add_argument("--support", default="random", choices=("random", "block"), help="SLTrain sparse support")
    p.add_argument("--block-size", type=int, default=None,
                   help="SLTrain block support: block edge (default: the recipe's, 32)")
    p.add_argument("--data", nargs="+", default=None,
                   help="`stdlib` (this Python's standard-library sources: always there), `debian-docs` (the "
                        "Python docs of Debian's python3.11-doc) or text files/folders (default: debian-docs "
                        "where installed, else stdlib)")
    p.add_argument("--tokenizer", default="smollm2",
                   help="smollm2, or bytes (UTF-8 bytes: a stand-in that needs no files)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="held-out share of tokens, whole documents")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 10%% of --steps)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0: off)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="bf16: autocast, fp32 weights")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=20, help="held-out micro-batches per evaluation")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop (with a checkpoint) after this step, as if interrupted; the schedule still "
                        "runs to --steps")
    p.add_argument("--out", default="runs/pretrain", help="folder for metrics.json, curves.png, checkpoint.pt")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from OUT/checkpoint.pt (or the given checkpoint file)")
    p.add_argument("--overwrite", action="store_true",
                   help="start from step 0 even if OUT holds an earlier run, replacing it (without this or "
                        "--resume, an earlier run in OUT is an error)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--compile", nargs="?", const="fxsparse", default=None, choices=["fxsparse", "inductor"],
                   help="train and evaluate under torch.compile with this backend; --compile alone means fxsparse "
                        "(default: off)")
    p.add_argument("--save-hf", metavar="DIR", default=None,
                   help="at the end, also write a Hugging Face model folder (low-rank/sparse merged to dense)")
    p.set_defaults(func=run)
    return p


def _validate(args: argparse.Namespace) -> None:
    positive = ("seq_len", "batch_size", "grad_accum", "steps", "eval_every")
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if args.warmup is not None and not 0 <= args.warmup <= args.steps:
        raise ValueError(f"--warmup must be in [0, --steps={args.steps}], got {args.warmup}")
    if args.stop_at is not None and not 1 <= args.stop_at <= args.steps:
        raise ValueError(f"--stop-at must be in [1, --steps={args.steps}], got {args.stop_at}")
    if args.rank is not None and args.rank < 1:
        raise ValueError(f"--rank must be at least 1, got {args.rank}")
    _validate_recipe_values(args)


def _validate_recipe_values(args: argparse.Namespace) -> None:
    """The value options checked against each other and the model size, before any tokenizer or model loads."""
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if not 0 <= args.min_lr_ratio <= 1:
        raise ValueError(f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio}")
    for name in ("clip", "weight_decay", "save_every", "eval_batches"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.recipe == "sltrain" and not 0 < args.sparsity < 1:
        raise ValueError(f"--sparsity is the density of the sparse part and must be in (0, 1), e.g. 0.03; got "
                         f"{args.sparsity} (for no sparse part use --recipe lowrank)")
    if args.alpha is not None and not 0 < args.alpha < math.inf:
        raise ValueError(f"--alpha must be a positive finite number, got {args.alpha}")
    if args.block_size is not None and args.block_size < 1:
        raise ValueError(f"--block-size must be at least 1, got {args.block_size}")
    preset = preset_from_config(args.config) if args.config else PRESETS.get(args.preset)
    if preset is None or args.recipe == "dense":
        return
    narrowest = min(preset.hidden_size, preset.intermediate_size)
    if args.rank is not None and args.rank >= narrowest:
        raise ValueError(f"--rank {args.rank} must be below {narrowest}, the narrowest side of the {preset.name} "
                         f"model's projections (hidden {preset.hidden_size}, FFN {preset.intermediate_size})")
    if args.recipe == "sltrain" and args.support == "block" and (args.block_size or 32) > narrowest:
        raise ValueError(f"--block-size {args.block_size or 32} is wider than the {preset.name} model's narrowest "
                         f"projection side ({narrowest}): pass --block-size {narrowest} or less")


# How a mismatched setting is named when a resume refuses it (run_loop names everything else by its key).
_FLAGS = {
    "preset": "--preset/--config", "model": "--preset/--config", "recipe": "--recipe",
    "recipe_options": "--rank/--alpha/--sparsity/--support/--block-size", "seq_len": "--seq-len",
    "batch_size": "--batch-size", "grad_accum": "--grad-accum", "dtype": "--dtype", "seed": "--seed",
    "corpus_key": "--data/--tokenizer", "vocab_size": "--tokenizer", "tokenizer": "--tokenizer",
    "eos_token_id": "--tokenizer", "val_fraction": "--val-fraction", "steps": "--steps", "warmup_steps": "--warmup",
    "min_lr_ratio": "--min-lr-ratio", "schedule": "the schedule", "floor_after_last": "the schedule", "lr": "--lr",
    "weight_decay": "--weight-decay", "max_grad_norm": "--clip", "betas": "AdamW betas",
}
# Run settings a resume must match; the schedule and the optimizer settings are checked by run_loop.
_RESUME_KEYS = ("preset", "model", "recipe", "recipe_options", "seq_len", "batch_size", "grad_accum", "dtype", "seed",
                "corpus_key", "val_fraction", "vocab_size", "tokenizer", "eos_token_id")


def run(args: argparse.Namespace, tokenizer: Any = None) -> dict[str, Any]:
    """Train as ``args`` says; write ``metrics.json``, ``curves.png`` and ``checkpoint.pt`` under ``args.out``.

    ``tokenizer`` overrides ``--tokenizer`` (tests pass a stand-in). Prints a summary at the end (held-out
    perplexity, tokens, time, files, how to continue). Returns the metrics dict.
    """
    from fxsparse.app.corpus import load_corpus, pack_sequences, split_documents
    from fxsparse.app.loop import check_out_dir, init_distributed, plot_curves, run_loop, write_text_atomic

    _validate(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.config:
        preset = preset_from_config(args.config)
    elif args.preset in PRESETS:
        preset = PRESETS[args.preset]
    else:
        raise ValueError(f"unknown preset {args.preset!r}; choose one of {list(PRESETS)} or give --config")
    out = Path(args.out)
    check_out_dir(out, (CHECKPOINT_NAME, "metrics.json"), args.resume, getattr(args, "overwrite", False))
    checkpoint_path = out / CHECKPOINT_NAME
    resume_path = None
    if args.resume:
        resume_path = checkpoint_path if args.resume == "auto" else Path(args.resume)
        if not resume_path.exists():
            raise ValueError(f"--resume: checkpoint {str(resume_path)!r} does not exist")
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(args.tokenizer)
    corpus = load_corpus(args.data, tokenizer)
    train_ids, val_ids = split_documents(corpus, args.val_fraction, seed=0)
    train_seqs = pack_sequences(train_ids, args.seq_len)
    val_seqs = pack_sequences(val_ids, args.seq_len)
    rank, world = init_distributed()  # under torchrun: each rank its own batch order, gradients averaged
    batches = TrainBatches(train_seqs, args.batch_size, args.seed + rank)

    options = recipe_options(args, preset)
    model = build_model(preset, len(tokenizer), args.seq_len, args.seed, tokenizer.eos_token_id)
    model = apply_recipe(model, args.recipe, options)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    if getattr(args, "compile", None):
        from fxsparse.compile import compile_module

        compile_module(model, backend=args.compile)  # in place: state_dict keys (checkpoints) unchanged
    warmup = args.warmup if args.warmup is not None else args.steps // 10
    tokens_per_step = args.batch_size * args.grad_accum * args.seq_len
    embedding_params = sum(m.weight.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings()))
    total_params = sum(p.numel() for p in model.parameters())
    config = {
        "preset": preset.name, "model": asdict(preset), "recipe": args.recipe, "recipe_options": options,
        "seq_len": args.seq_len, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
        "steps": args.steps, "lr": args.lr, "warmup": warmup, "min_lr_ratio": args.min_lr_ratio,
        "weight_decay": args.weight_decay, "clip": args.clip, "dtype": args.dtype, "seed": args.seed,
        "corpus_key": corpus.key, "val_fraction": args.val_fraction, "vocab_size": len(tokenizer),
        "tokenizer": args.tokenizer, "eos_token_id": tokenizer.eos_token_id,
    }

    def step() -> tuple[float, int]:
        micro_batches = [batches.next().to(device) for _ in range(args.grad_accum)]
        return accumulate_gradients(model, micro_batches, args.dtype), tokens_per_step

    def held_out() -> dict[str, float]:
        val_loss = evaluate(model, val_seqs, args.batch_size, args.eval_batches, args.dtype)
        return {"val_loss": val_loss, "val_ppl": math.exp(val_loss)}

    result = run_loop(
        model, step, steps=args.steps, lr=args.lr, warmup_steps=warmup, schedule="cosine",
        min_lr_ratio=args.min_lr_ratio, floor_after_last=True, weight_decay=args.weight_decay,
        max_grad_norm=args.clip or None, data=batches, checkpoint_path=checkpoint_path,
        checkpoint_every=args.save_every, resume=resume_path, full_state=True, stop_at=args.stop_at,
        evaluate=held_out, eval_every=args.eval_every, config={key: config[key] for key in _RESUME_KEYS},
        flags=_FLAGS, model_name=preset.name, progress=not args.no_progress, desc=f"{preset.name}/{args.recipe}",
    )
    if rank != 0:
        return {"rank": rank, "world_size": world, "steps_done": result.steps}  # rank 0 writes and reports
    metrics: dict[str, Any] = {
        "config": config,
        "corpus": {"documents": corpus.num_documents, "tokens": corpus.num_tokens,
                   "train_tokens": int(len(train_ids)), "val_tokens": int(len(val_ids)),
                   "train_sequences": len(train_seqs), "val_sequences": len(val_seqs)},
        "params_total": total_params,
        "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "params_non_embedding": total_params - embedding_params,
        "tokens_per_step": tokens_per_step,
        "history": result.history, "evals": result.evals, "wall_time_s": result.wall_time_s,
        "resumed_from": result.resumed_from, "resume_notes": result.notes,
        "steps_done": result.steps, "tokens_seen": result.tokens,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "world_size": world,
    }
    if result.evals:
        metrics["final_val_loss"] = result.evals[-1]["val_loss"]
        metrics["final_val_ppl"] = result.evals[-1]["val_ppl"]
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=1))
    written = [checkpoint_path, out / "metrics.json"]
    if result.history:
        plot_curves(out / "curves.png", result.history, result.evals, f"{preset.name} / {args.recipe}")
        written.append(out / "curves.png")
    if getattr(args, "save_hf", None):
        written.append(export_hf(checkpoint_path, args.save_hf))
    print(_summary(args, metrics, written), flush=True)
    return metrics


def _summary(args: argparse.Namespace, metrics: dict[str, Any], written: list[Path]) -> str:
    """What a run did and how to go on: held-out numbers, tokens, time, files, the command to continue."""
    from fxsparse.app.loop import command_line

    config = metrics["config"]
    done, steps = metrics["steps_done"], config["steps"]
    lines = [f"pretrain {config['preset']}/{config['recipe']}: step {done} of {steps}, "
             f"{metrics['tokens_seen']:,} tokens, {metrics['wall_time_s']:.1f} s of training"
             + (f" (resumed at step {metrics['resumed_from']})" if metrics["resumed_from"] else "")]
    if "final_val_loss" in metrics:
        lines.append(f"held-out loss {metrics['final_val_loss']:.4f}, perplexity {metrics['final_val_ppl']:.2f} "
                     f"(step {metrics['evals'][-1]['step']})")
    lines.append("wrote " + ", ".join(str(path) for path in written))
    command = command_line(add_parser, "pretrain", args)
    if done < steps:
        lines.append(f"continue to step {steps}: {command} --resume")
    else:
        # the warm-up spelled out: its default (a tenth of --steps) would grow with --steps and be refused
        longer = command_line(add_parser, "pretrain", args, steps=2 * steps, warmup=config["warmup"])
        lines.append(f"train longer: {longer} --resume")
        if not getattr(args, "save_hf", None):
            lines.append(f"as a Hugging Face model folder: fxsparse export {shlex.quote(str(written[0]))} --out DIR")
    return "\n".join(lines)


def export_hf(checkpoint_path: str | Path, out_dir: str | Path) -> Path:
    """Turn a ``pretrain`` checkpoint into a Hugging Face model folder (SLTrain / low-rank merged to dense).

    ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it and gives the trained model's logits. The
    SmolLM2 tokenizer is saved beside it when the run used it. Returns ``out_dir``.
    """
    import fxsparse
    from fxsparse.app.checkpoint import load_checkpoint
    from fxsparse.app.loop import CHECKPOINT_FORMAT

    checkpoint_path, out_dir = Path(checkpoint_path), Path(out_dir)
    state = load_checkpoint(checkpoint_path)
    config = state.get("config", {})
    if state.get("format") != CHECKPOINT_FORMAT or "model" not in state or "recipe" not in config:
        raise ValueError(f"{str(checkpoint_path)!r} is not an fxsparse pretrain checkpoint (fine-tuning checkpoints "
                         "hold only the trainable blocks: use the adapter or `fxsparse merge` for those)")
    preset = Preset(**config["model"])
    model = build_model(preset, config["vocab_size"], config["seq_len"], config["seed"], config.get("eos_token_id"))
    model = apply_recipe(model, config["recipe"], config["recipe_options"])
    model.load_state_dict(state["model"])
    if config["recipe"] != "dense":
        model = fxsparse.merge(model)
    model.eval()
    model.save_pretrained(out_dir)
    if config.get("tokenizer") == "smollm2":
        _load_tokenizer("smollm2").save_pretrained(out_dir)
    return out_dir


def parse_args(argv: list[str]) -> argparse.Namespace:
    """``fxsparse pretrain ARGV`` parsed into the namespace :func:`run` takes (for scripts and tests)."""
    parser = argparse.ArgumentParser(prog="fxsparse")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["pretrain", *argv])


if __name__ == "__main__":
    import sys

    run(parse_args(sys.argv[1:]))
