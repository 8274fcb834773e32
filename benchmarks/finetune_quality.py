"""Fine-tuning quality at matched trainable budgets: in-distribution, shifted, and forgetting.

A small-scale test of S²FT's claim that at an equal trainable budget it generalises better out of
distribution and forgets less than LoRA. On SmolLM2-135M-Instruct, with the application's own training
loop (``fxsparse.app.train.train``: AdamW, warm-up + cosine, clipping) and data (``fxsparse.app.data``):

- methods, all at S²FT's default trainable count unless said: ``s2ft`` (default ratios ``o`` 0.052,
  ``down`` 0.02; the seed draws the units); ``lora`` (PEFT, the rank whose count is nearest, on q, k, v, o,
  gate, up, down); ``shira`` (PEFT SHiRA at that rank: the same count of random entries; the seed draws the
  mask); ``supertuning`` (PEFT Super-Tuning, the largest-magnitude entries, sparsity matched); ``full``
  (every parameter: the unmatched reference);
- learning rate: each method trains once per value of its grid (first seed) and the value with the best
  exact match on a validation split (drawn apart from training and test; ties broken by the validation
  response-token loss) is kept; the other seeds then train at that value only;
- in distribution: exact match on held-out prompts of the built-in task (``fxsparse finetune
  --list-tasks``; default ``add``, two-digit addition);
- shifted: exact match on the same task with longer operands (three-digit addition) and in an unseen
  prompt format ("Compute 37 plus 48.");
- forgetting: perplexity on held-out general text (the standard-library corpus of ``fxsparse.app.corpus``,
  held-out documents) after fine-tuning, relative to the base model's (``ppl_change`` = after / before - 1).

Writes one row per training run (``chosen`` = 1 for the learning rate kept; test metrics only there) plus
a ``base`` row (the model before fine-tuning) to ``benchmarks/results/finetune_quality.csv``, and from the
latest run ``finetune_quality.md`` (mean ± sample std over seeds) and ``finetune_quality.png``::

    python benchmarks/finetune_quality.py                 # 5 methods x 3 lr + 2 more seeds: hours on 2 cores
    python benchmarks/finetune_quality.py --methods s2ft,lora --seeds 0 --lr-grid s2ft=2e-3 --lr-grid lora=2e-3
    python benchmarks/finetune_quality.py --tiny          # tiny random LLaMA, 2 steps, writes nothing
    python benchmarks/finetune_quality.py --resume        # continue an interrupted run (same options)

Each training run's row is journaled as it ends (``finetune_quality.journal.jsonl`` in the results folder);
``--resume`` trains only what the interrupted run had not finished.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import random
import statistics
import string
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _env import append_rows, device_name, git_rev, load_average, read_rows, require_clean_tree
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_s2ft  # noqa: E402  (a sibling script: the PEFT builders and budget matching are shared)

RESULTS = HERE / "results"
CSV_NAME, MD_NAME, PNG_NAME = "finetune_quality.csv", "finetune_quality.md", "finetune_quality.png"
JOURNAL_NAME = "finetune_quality.journal.jsonl"  # the rows of an unfinished run (not committed)
METHODS = ("s2ft", "lora", "shira", "supertuning", "full")
# Learning-rate grids per method: the sparse and low-rank methods move few weights and take larger steps
# (the fxsparse demo trains S²FT at 2e-3); full fine-tuning moves every weight and takes small ones.
# A first run over 5e-4, 1e-3, 2e-3 (AMD EPYC, 2026-12-07, not kept: interrupted) chose the top value for both
# S²FT and LoRA, validation EM rising all the way (S²FT 0.33, 0.47, 0.56; LoRA 0.47, 0.61, 0.81): the grid
# now spans 1e-3 to 1e-2.
DEFAULT_GRIDS = {"s2ft": [1e-3, 3e-3, 1e-2], "lora": [1e-3, 3e-3, 1e-2], "shira": [1e-3, 3e-3, 1e-2],
                 "supertuning": [1e-3, 3e-3, 1e-2], "full": [1e-5, 3e-5, 1e-4]}
FIELDS = ["run_id", "date", "device", "git_rev", "torch", "threads", "model", "task", "method", "budget_params",
          "trainable_params", "lora_rank", "sparsity", "lr", "lr_grid", "chosen", "seed", "steps", "batch_size",
          "train_n", "val_n", "test_n", "val_em", "val_loss", "test_em", "longer_em", "format_em", "ppl_before",
          "ppl_after", "ppl_change", "train_s", "load_avg"]


# ---------------------------------------------------------------- data: the task and its shifted versions


def _digits(rng: random.Random, lo: int, hi: int) -> str:
    return ", ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(lo, hi)))


def _letters(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def _add_longer(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(100, 999), r.randint(100, 999)
    return f"What is {a} + {b}?", str(a + b)


def _add_format(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(10, 99), r.randint(10, 99)
    return f"Compute {a} plus {b}.", str(a + b)


def _reverse_longer(r: random.Random) -> tuple[str, str]:
    word = _letters(r, 8, 10)
    return f"Reverse the letters of '{word}'.", word[::-1]


def _reverse_format(r: random.Random) -> tuple[str, str]:
    word = _letters(r, 4, 6)
    return f"Write '{word}' backwards.", word[::-1]


def _sort_longer(r: random.Random) -> tuple[str, str]:
    shown = _digits(r, 8, 10)
    return f"Sort from smallest to largest: {shown}", ", ".join(sorted(shown.split(", ")))


def _sort_format(r: random.Random) -> tuple[str, str]:
    shown = _digits(r, 4, 6)
    return f"Put these digits in ascending order: {shown}", ", ".join(sorted(shown.split(", ")))


# task -> shifted versions of its prompts: longer operands than training saw, and a prompt format it never saw
SHIFTS: dict[str, dict[str, Callable[[random.Random], tuple[str, str]]]] = {
    "add": {"longer": _add_longer, "format": _add_format},
    "reverse": {"longer": _reverse_longer, "format": _reverse_format},
    "sort-digits": {"longer": _sort_longer, "format": _sort_format},
}


def shifted_examples(task: str, kind: str, n: int, seed: int = 0) -> list:
    """``n`` distinct examples of ``task`` shifted by ``kind`` (``longer`` or ``format``), seeded.

    >>> [e.prompt for e in shifted_examples("add", "format", 2)]  # doctest: +ELLIPSIS
    ['Compute ... plus ....', 'Compute ... plus ....']
    >>> all(len(e.response) >= 3 for e in shifted_examples("add", "longer", 20))
    True
    """
    from fxsparse.app.data import Example

    rng = random.Random(f"fxsparse-shift:{task}:{kind}:{seed}")
    seen: dict[str, str] = {}
    while len(seen) < n:
        prompt, response = SHIFTS[task][kind](rng)
        seen.setdefault(prompt, response)
    return [Example(p, r) for p, r in seen.items()]


def task_data(task: str, train_n: int, val_n: int, test_n: int, seed: int = 0) -> dict[str, list]:
    """Disjoint ``train`` / ``val`` / ``test`` splits of built-in ``task`` plus its ``longer`` and ``format`` sets."""
    from fxsparse.app.data import task_splits

    train, test = task_splits(task, train_n + val_n, test_n, seed=seed)
    return {"train": train[val_n:], "val": train[:val_n], "test": test,
            "longer": shifted_examples(task, "longer", test_n, seed),
            "format": shifted_examples(task, "format", test_n, seed)}


# ---------------------------------------------------------------- general text for forgetting


def general_text(tokenizer, seq_len: int, n_seqs: int, tiny: bool) -> torch.Tensor:
    """``n_seqs`` x ``seq_len`` token ids of held-out general text: standard-library documents that
    ``fxsparse.app.corpus.split_documents`` holds out (seed 0). The tiny model's character tokenizer
    reads a few standard-library files directly instead (it has no batch encoding for the corpus cache)."""
    from fxsparse.app.corpus import load_corpus, pack_sequences, split_documents, stdlib_corpus_files

    if tiny:
        text = "".join(path.read_text(errors="replace") for path in stdlib_corpus_files(max_bytes=60_000)[:4])
        ids = [i for i in tokenizer.encode(text) if i != tokenizer.unk_token_id]
        import numpy as np

        return pack_sequences(np.asarray(ids), seq_len)[:n_seqs]
    corpus = load_corpus(["stdlib"], tokenizer, log=print)
    _, held_out = split_documents(corpus, val_fraction=0.05, seed=0)
    return pack_sequences(held_out, seq_len)[:n_seqs]


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, batch_size: int = 4) -> float:
    """exp of the mean next-token loss of ``model`` over the rows of ``ids`` (all the same length)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size].to(device)
            loss = model(input_ids=chunk, labels=chunk, use_cache=False).loss
            tokens = chunk.numel() - len(chunk)
            total += float(loss) * tokens
            count += tokens
    finally:
        model.train(was_training)
    return float(torch.exp(torch.tensor(total / count)))


# ---------------------------------------------------------------- methods at a matched budget


def build_method(method: str, base: nn.Module, budget: int, seed: int) -> tuple[nn.Module, dict]:
    """The trainable model of ``method`` on a copy of ``base`` (PEFT models unwrapped to the transformers
    model holding the adapter layers) and what was matched (``lora_rank`` / ``sparsity``)."""
    import fxsparse

    torch.manual_seed(seed)  # LoRA's A, SHiRA's and Super-Tuning's initialisation draw from it
    if method == "s2ft":
        return fxsparse.transform(copy.deepcopy(base), recipe="s2ft", ratios=dict(bench_s2ft.DEFAULT_RATIOS),
                                  seed=seed), {}
    if method == "full":
        return bench_s2ft.build_full(base), {}
    if method in ("lora", "shira"):
        rank = bench_s2ft.matched_rank(base, budget)
        model = bench_s2ft.build_peft(base, method, rank=rank, seed=seed)
        return model.get_base_model(), {"lora_rank": rank}
    if method == "supertuning":
        model = bench_s2ft.build_peft(base, method, budget=budget)
        return model.get_base_model(), {"sparsity": f"{bench_s2ft.supertuning_sparsity(base, budget):.6f}"}
    raise ValueError(f"unknown method {method!r}")


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fine_tune(model: nn.Module, tokenizer, examples: list, args, lr: float, seed: int) -> float:
    """Train ``model`` in place with the application's loop; returns the seconds it took."""
    from fxsparse.app.data import BatchStream, encode_examples
    from fxsparse.app.train import train

    stream = BatchStream(encode_examples(tokenizer, examples, args.seq_len), args.batch_size,
                         tokenizer.pad_token_id, seed=seed)
    torch.manual_seed(seed)
    start = time.perf_counter()
    train(model, stream, steps=args.steps, lr=lr, warmup_steps=args.warmup, progress=False)
    return time.perf_counter() - start


@torch.no_grad()
def response_loss(model: nn.Module, tokenizer, examples: list, args) -> float:
    """Mean response-token loss of ``model`` on ``examples`` (``fxsparse.app.train.causal_lm_loss``)."""
    from fxsparse.app.data import collate, encode_examples
    from fxsparse.app.train import causal_lm_loss

    encoded = encode_examples(tokenizer, examples, args.seq_len)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(encoded), args.eval_batch_size):
            loss, tokens = causal_lm_loss(model, collate(encoded[start:start + args.eval_batch_size],
                                                         tokenizer.pad_token_id))
            total, count = total + float(loss), count + tokens
    finally:
        model.train(was_training)
    return total / count


def exact(model: nn.Module, tokenizer, examples: list, batch_size: int) -> float:
    from fxsparse.app.data import exact_match

    return exact_match(model, tokenizer, examples, batch_size=batch_size)[0]


# ---------------------------------------------------------------- the experiment


def load(args) -> tuple[nn.Module, object, str]:
    if args.tiny:
        from fxsparse.app.data import CharTokenizer
        from fxsparse.models import tiny_model

        torch.manual_seed(0)
        return tiny_model("llama"), CharTokenizer(), "tiny-llama"
    from fxsparse.app.models import load_default_model

    model, tokenizer = load_default_model()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, "SmolLM2-135M-Instruct"


class Journal:
    """The rows of an unfinished run, one JSON line per training run as it ends (fsync'd), so that an
    interruption of a run of hours loses one training run at most: ``--resume`` reuses every row whose settings
    match and trains only what is missing. A first line records the settings, the code revision and the run id;
    resuming under other settings or other code is refused, since every row of one run must come from the same
    code and settings. ``path`` None keeps nothing (toy runs that write no results).
    """

    def __init__(self, path: Path | None, settings: dict, resume: bool, run_id: str):
        self.path, self.rows, self.run_id = path, {}, run_id
        if path is None:
            return
        if resume and path.exists():
            lines = []
            for text in path.read_text().splitlines():
                try:
                    lines.append(json.loads(text))
                except json.JSONDecodeError:  # a line cut short by the interruption: that run trains again
                    break
            head = lines[0] if lines else {}
            if head.get("settings") != settings:
                theirs = head.get("settings") or {}
                changed = sorted(k for k in set(settings) | set(theirs) if settings.get(k) != theirs.get(k))
                raise SystemExit(f"--resume: the unfinished run in {path} has other settings or code "
                                 f"({', '.join(changed) or 'unreadable'}); run without --resume to start over")
            self.run_id = head["run_id"]
            self.rows = {line["key"]: line["row"] for line in lines[1:]}
            print(f"resuming run {self.run_id}: {len(self.rows)} rows already done ({path})", flush=True)
            return
        if path.exists() and not resume:
            print(f"starting over: {path} held an unfinished run (--resume continues one)", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"settings": settings, "run_id": run_id}) + "\n")

    def get(self, key: str) -> dict | None:
        return self.rows.get(key)

    def put(self, key: str, row: dict) -> None:
        self.rows[key] = row
        if self.path is None:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps({"key": key, "row": row}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def settings(args) -> dict:
    """What decides a run's results (and so whether a journal may be resumed): every option but where the
    results go and whether to resume, plus the code revision."""
    skip = {"resume", "dry_run", "out", "allow_dirty", "lr_grid"}
    out = {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items()) if k not in skip}
    return json.loads(json.dumps({**out, "git_rev": git_rev()}))  # as a journal reads it back (lists, not tuples)


def run(args, journal_path: Path | None = None) -> list[dict]:
    torch.set_num_threads(args.threads)
    base, tokenizer, model_name = load(args)
    if torch.cuda.is_available():
        base.cuda()
    data = task_data(args.task, args.train_n, args.val_n, args.test_n, seed=args.data_seed)
    general = general_text(tokenizer, args.ppl_seq_len, args.ppl_seqs, args.tiny)
    budget = _trainable(build_method("s2ft", base, 0, 0)[0])
    run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    journal = Journal(journal_path, settings(args), getattr(args, "resume", False), run_id)
    meta = {"run_id": journal.run_id, "device": device_name(), "git_rev": git_rev(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "model": model_name, "task": args.task, "budget_params": budget,
            "steps": args.steps, "batch_size": args.batch_size, "train_n": len(data["train"]),
            "val_n": len(data["val"]), "test_n": len(data["test"])}
    bs = args.eval_batch_size

    def evaluate(model: nn.Module) -> dict:
        scores = {f"{name}_em": exact(model, tokenizer, data[name], bs) for name in ("test", "longer", "format")}
        return {**scores, "ppl_after": perplexity(model, general)}

    def stamp() -> dict:
        return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
                "load_avg": f"{load_average():.1f}"}

    base_row = journal.get("base")
    if base_row is None:
        ppl_before = perplexity(base, general)
        before = evaluate(base)
        base_row = {**meta, **stamp(), "method": "base", "trainable_params": 0, "chosen": 1, "seed": "",
                    "val_em": f"{exact(base, tokenizer, data['val'], bs):.4f}", "ppl_before": f"{ppl_before:.3f}",
                    **{k: f"{v:.4f}" for k, v in before.items() if k != "ppl_after"},
                    "ppl_after": f"{ppl_before:.3f}", "ppl_change": "0.0000"}
        journal.put("base", base_row)
    ppl_before = float(base_row["ppl_before"])
    rows = [base_row]
    print(f"base: val/test/longer/format EM {rows[0]['val_em']} {rows[0]['test_em']} {rows[0]['longer_em']} "
          f"{rows[0]['format_em']}, general-text ppl {ppl_before:.2f}; S²FT budget {budget:,} parameters", flush=True)

    def one(method: str, lr: float, seed: int, chosen: bool, model=None, info=None, seconds=None) -> tuple:
        key = f"{method}|{lr:g}|{seed}|{int(chosen)}"
        done = journal.get(key)
        if done is not None:
            print(f"{method} lr {lr:g} seed {seed}: val EM {done['val_em']} (done before the interruption)", flush=True)
            return done, model, info, seconds
        if model is None:
            model, info = build_method(method, base, budget, seed)
            seconds = fine_tune(model, tokenizer, data["train"], args, lr, seed)
        row = {**meta, **stamp(), **info, "method": method, "trainable_params": _trainable(model), "lr": f"{lr:g}",
               "lr_grid": ":".join(f"{v:g}" for v in args.grids[method]), "chosen": int(chosen), "seed": seed,
               "val_em": f"{exact(model, tokenizer, data['val'], bs):.4f}", "ppl_before": f"{ppl_before:.3f}",
               "val_loss": f"{response_loss(model, tokenizer, data['val'], args):.4f}", "train_s": f"{seconds:.1f}"}
        if chosen:
            scores = evaluate(model)
            row.update({k: f"{v:.4f}" for k, v in scores.items() if k != "ppl_after"},
                       ppl_after=f"{scores['ppl_after']:.3f}", ppl_change=f"{scores['ppl_after'] / ppl_before - 1:.4f}")
        journal.put(key, row)
        print(f"{method} lr {lr:g} seed {seed}: val EM {row['val_em']}"
              + (f", test {row['test_em']} longer {row['longer_em']} format {row['format_em']} ppl change "
                 f"{row['ppl_change']}" if chosen else "") + f" ({row['train_s']} s training)", flush=True)
        return row, model, info, seconds

    for method in args.methods:
        grid, first = args.grids[method], args.seeds[0]
        if len(grid) == 1:
            chosen_lr = grid[0]
        else:  # the grid on the first seed: best validation exact match, ties broken by validation loss
            best = None
            for lr in grid:
                row, model, info, seconds = one(method, lr, first, False)
                rows.append(row)
                key = (float(row["val_em"]), -float(row["val_loss"]))
                if best is None or key > (float(best[0]["val_em"]), -float(best[0]["val_loss"])):
                    best = (row, model, info, seconds)
                del model
            chosen_lr = float(best[0]["lr"])
            # the kept model's test metrics: the same training, evaluated now that it is chosen
            rows.remove(best[0])
            rows.append(one(method, chosen_lr, first, True, *best[1:])[0])
            best = None
        for seed in (args.seeds if len(grid) == 1 else args.seeds[1:]):
            rows.append(one(method, chosen_lr, seed, True)[0])
    return rows


# ---------------------------------------------------------------- results files


def append_csv(path: Path, rows: list[dict]) -> None:
    append_rows(path, FIELDS, rows)


def read_csv(path: Path) -> list[dict]:
    return read_rows(path)


def summary(rows: list[dict]) -> list[dict]:
    """Per method of one run (chosen rows only, in order): seeds, lr, and mean / sample std of each metric.

    >>> rows = [{"method": "lora", "chosen": "1", "seed": s, "lr": "0.001", "trainable_params": "10",
    ...          "test_em": t, "longer_em": "0", "format_em": "0", "ppl_change": "0.1"} for s, t in (("0", "0.5"),
    ...                                                                                              ("1", "0.7"))]
    >>> item = summary(rows)[0]
    >>> item["method"], item["n"], item["test_em"], round(item["test_em_std"], 4)
    ('lora', 2, 0.6, 0.1414)
    """
    out = []
    chosen = [r for r in rows if r["chosen"] == "1"]
    for method in dict.fromkeys(r["method"] for r in chosen):
        mine = [r for r in chosen if r["method"] == method]
        item = {"method": method, "n": len(mine), "lr": mine[0].get("lr", ""),
                "trainable_params": mine[0]["trainable_params"]}
        for key in ("test_em", "longer_em", "format_em", "ppl_change"):
            values = [float(r[key]) for r in mine if r.get(key) not in (None, "")]
            item[key] = statistics.fmean(values) if values else float("nan")
            item[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(item)
    return out


def latest(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["run_id"] == rows[-1]["run_id"]] if rows else []


def write_markdown(rows: list[dict], path: Path) -> None:
    last = latest(rows)
    first = last[0]
    lines = [
        "# Fine-tuning quality at matched trainable budgets (generated by benchmarks/finetune_quality.py from "
        f"{CSV_NAME})", "",
        f"Run {first['run_id']} at `{first['git_rev']}` on {first['device']}, {first['threads']} threads; "
        f"{first['model']}, task `{first['task']}`, {first['steps']} steps of {first['batch_size']} examples "
        f"({first['train_n']} training, {first['val_n']} validation, {first['test_n']} per test set); S²FT budget "
        f"{int(first['budget_params']):,} trainable parameters. Exact match (EM): in distribution (`test`), "
        "longer operands (`longer`), unseen prompt format (`format`); forgetting: general-text perplexity "
        "after / before - 1 (lower is less forgetting). Mean ± sample std over seeds at the learning rate chosen "
        "on the validation split.", "",
        "| method | trainable | lr | seeds | test EM | longer EM | format EM | ppl change |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for item in summary(last):
        cells = [f"{item[k]:.3f} ± {item[k + '_std']:.3f}" for k in ("test_em", "longer_em", "format_em",
                                                                      "ppl_change")]
        lines.append(f"| {item['method']} | {int(item['trainable_params']):,} | {item['lr'] or '-'} | {item['n']} | "
                     + " | ".join(cells) + " |")
    grid = [r for r in last if r["method"] != "base"]
    lines += ["", "Learning-rate selection (first seed; validation EM, then validation loss):", "",
              "| method | lr | val EM | val loss | chosen |", "|---|---:|---:|---:|---:|"]
    first_seed = [r for r in grid if r["seed"] == grid[0]["seed"]] if grid else []
    for r in sorted(first_seed, key=lambda r: (list(dict.fromkeys(x["method"] for x in grid)).index(r["method"]),
                                               float(r["lr"]))):
        lines.append(f"| {r['method']} | {r['lr']} | {r['val_em']} | {r.get('val_loss') or '-'} | "
                     f"{'yes' if r['chosen'] == '1' else ''} |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = latest(rows)
    items = summary(last)
    names = [i["method"] for i in items]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    for ax, key, label in zip(axes, ("test_em", "longer_em", "format_em", "ppl_change"),
                              ("in-distribution EM", "longer operands EM", "unseen format EM",
                               "general-text perplexity change"), strict=True):
        ax.bar(names, [i[key] for i in items], yerr=[i[key + "_std"] for i in items], capsize=3,
               color=["tab:blue" if n == "s2ft" else "tab:gray" if n == "base" else "tab:orange" for n in names])
        ax.set_title(label, fontsize=9)
        if key != "ppl_change":
            ax.set_ylim(0, 1)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    first = last[0]
    fig.suptitle(f"{first['model']}, task {first['task']}, {first['steps']} steps, matched budget "
                 f"{int(first['budget_params']):,}; mean ± std over seeds; {first['date']} ({first['git_rev']})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- command line


def _methods(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or any(n not in METHODS for n in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"methods must be distinct names among {','.join(METHODS)}; got {text!r}")
    return names


def _grid(text: str) -> tuple[str, list[float]]:
    """``"lora=5e-4:1e-3"`` -> ``("lora", [0.0005, 0.001])``.

    >>> _grid("full=1e-5:3e-5")
    ('full', [1e-05, 3e-05])
    """
    method, sep, values = text.partition("=")
    try:
        lrs = [float(v) for v in values.split(":") if v.strip()]
    except ValueError:
        lrs = []
    if not sep or method not in METHODS or not lrs or any(v <= 0 for v in lrs):
        raise argparse.ArgumentTypeError(f"--lr-grid takes METHOD=LR[:LR...] with METHOD in {METHODS}; got {text!r}")
    return method, lrs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="add", choices=sorted(SHIFTS))
    p.add_argument("--methods", type=_methods, default=list(METHODS))
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; 0 with --tiny)")
    p.add_argument("--lr-grid", type=_grid, action="append", default=[],
                   help="METHOD=LR[:LR...], repeatable (defaults: "
                        + "; ".join(f"{m}={':'.join(f'{v:g}' for v in g)}" for m, g in DEFAULT_GRIDS.items()) + ")")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (30; 2 with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (3; 0 with --tiny)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per step (16; 4 with --tiny)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--train-n", type=int, default=None, help="training examples (1000; 16 with --tiny)")
    p.add_argument("--val-n", type=int, default=None, help="validation examples (100; 4 with --tiny)")
    p.add_argument("--test-n", type=int, default=None, help="examples per test set (200; 4 with --tiny)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the task's examples (fixed across runs)")
    p.add_argument("--ppl-seqs", type=int, default=None, help="general-text sequences (16; 2 with --tiny)")
    p.add_argument("--ppl-seq-len", type=int, default=None, help="tokens per general-text sequence (256; 32 --tiny)")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume", action="store_true",
                   help=f"continue an interrupted run from {JOURNAL_NAME} in the results folder (same settings)")
    p.add_argument("--tiny", action="store_true", help="tiny random LLaMA, 2 steps; writes nothing unless --out")
    p.add_argument("--dry-run", action="store_true", help="print the rows, write no results files")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--allow-dirty", action="store_true",
                   help="record results from a checkout with uncommitted changes (tagged -dirty)")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.seeds = [int(s) for s in (args.seeds or ("0" if tiny else "0,1,2")).split(",") if s.strip()]
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        p.error("--seeds takes distinct integers")
    defaults = {"steps": (2, 30), "warmup": (0, 3), "batch_size": (4, 16), "train_n": (16, 1000), "val_n": (4, 100),
                "test_n": (4, 200), "ppl_seqs": (2, 16), "ppl_seq_len": (32, 256)}
    for name, (small, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else full)
    grids = {m: list(g) for m, g in DEFAULT_GRIDS.items()}
    if tiny:  # one learning rate each, two for S²FT: the selection still runs, in seconds
        grids = {m: [g[0], g[-1]] if m == "s2ft" else [g[-1]] for m, g in grids.items()}
    grids.update(dict(args.lr_grid))
    args.grids = grids
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    folder = (args.out or RESULTS).resolve()
    writes = not args.dry_run and (args.out is not None or not args.tiny)
    if writes and args.out is None:
        require_clean_tree(args.allow_dirty)
    rows = run(args, folder / JOURNAL_NAME if writes else None)
    if not writes:
        return
    path = folder / CSV_NAME
    append_csv(path, rows)
    (folder / JOURNAL_NAME).unlink(missing_ok=True)  # the run is whole: its rows are in the CSV now
    all_rows = read_csv(path)
    write_markdown(all_rows, folder / MD_NAME)
    write_plot(all_rows, folder / PNG_NAME)
    print((folder / MD_NAME).read_text())
    print(f"wrote {path}, {MD_NAME}, {PNG_NAME} in {folder}")


if __name__ == "__main__":
    main()
