"""Pre-training comparison: SLTrain (random and block support) vs dense vs low-rank-only, same steps and tokens.

Each recipe trains the same preset from the same seed on the same corpus (the Python documentation,
held-out split by document) with the same data order, schedule and learning rate; only the
parameterisation of the attention and FFN linears differs. Rows (device, date, git revision, recipe,
parameter counts, steps, tokens, final held-out perplexity, wall time) are appended to
``benchmarks/results/pretrain_compare.csv``; the markdown table and the perplexity plot are generated
from the CSV and the per-run metrics JSON copied next to it.

Rank and sparsity scale the paper's choice to the small preset: rank = hidden / 4 (the paper: 128 for
hidden 512), sparsity delta = 0.03, alpha = 32 (the paper's value below width 1024), block edge 16.
The low-rank-only baseline starts with both factors random (``fxsparse.app.pretrain`` re-draws ``B``): with
``B = 0`` and no sparse part every block gradient is exactly zero and the blocks never train.

Scale: the paper trains its 60M model on 1.1B tokens (11 000 steps of 131k tokens); a CPU run here sees
about 10^-4 of that, so it measures early training, not the capacity limit the paper's ordering shows.

    python benchmarks/pretrain_compare.py                        # the committed run (about 30 min, 2 cores)
    python benchmarks/pretrain_compare.py --steps 4 --eval-every 2 --results runs/smoke  # a smoke run
    python benchmarks/pretrain_compare.py --report-only          # regenerate table and plot
    python benchmarks/pretrain_compare.py --seeds 0,1,2          # 3 seeds per recipe (3x the time)

With ``--seeds`` every recipe trains once per seed (the seed draws the initial weights, the random
support of SLTrain and the data order; the held-out split stays fixed), and the report shows per recipe
the mean ± sample standard deviation (and min-max) of the final held-out perplexity over the seeds, and
the curves as the mean with a min-max band. Each row also records ``optimizer_state_bytes``: the bytes of
AdamW's state tensors (both moments and the step counters) read from the run's final checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import shutil
import statistics
from pathlib import Path

from _env import device_name, git_rev, require_clean_tree

from fxsparse.app.pretrain import PRESETS, parse_args, run

# label -> extra pretrain arguments; the baselines first, so an interrupted comparison still has them
RECIPES = {
    "dense": ["--recipe", "dense"],
    "lowrank": ["--recipe", "lowrank"],
    "sltrain-random": ["--recipe", "sltrain", "--support", "random"],
    "sltrain-block": ["--recipe", "sltrain", "--support", "block", "--block-size", "16"],
}
FIELDS = ["run_id", "device", "threads", "date", "git_rev", "recipe", "preset", "rank", "sparsity", "alpha",
          "lr", "params_total", "params_trainable", "params_non_embedding", "steps", "tokens", "final_val_loss",
          "final_val_ppl", "wall_time_s", "seed", "optimizer_state_bytes"]
# the columns the CSV had before seeds: its first rows carry only these (the header line grew, the rows did not)
OLD_FIELDS = FIELDS[:FIELDS.index("seed")]
ROOT = Path(__file__).resolve().parent.parent


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="9m", choices=list(PRESETS))
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--sparsity", type=float, default=0.03)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--rank", type=int, default=None, help="default hidden/4")
    p.add_argument("--data", nargs="+", default=None, help="default: the Python documentation sources")
    p.add_argument("--tokenizer", default="smollm2", choices=("smollm2", "bytes"),
                   help="bytes: a stand-in for smoke runs (benchmarks/quick.py), no model cache needed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=_seeds, default=None,
                   help="comma-separated seeds, each recipe trained once per seed (default: --seed alone)")
    p.add_argument("--runs", default=str(ROOT / "runs" / "pretrain_compare"), help="checkpoints and curves")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--report-only", action="store_true", help="only regenerate the table and plot")
    p.add_argument("--allow-dirty", action="store_true", help="record results from a checkout with uncommitted changes")
    args = p.parse_args(argv)
    args.seeds = args.seeds or [args.seed]
    return args


def _seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (distinct, in order).

    >>> _seeds("0, 1,2")
    [0, 1, 2]
    """
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds takes distinct integers, got {text!r}")
    return seeds


def _label_dir(args: argparse.Namespace, label: str, seed: int) -> Path:
    """The run folder of one recipe and seed (seed 0 keeps the folder runs had before seeds)."""
    return _run_dir(args) / (label if seed == 0 else f"{label}_seed{seed}")


def optimizer_state_bytes(checkpoint: Path) -> int | None:
    """Bytes of the optimizer's state tensors in a ``pretrain`` checkpoint (AdamW: both moments and the step
    counters), None when the checkpoint cannot be read."""
    import torch

    from fxsparse.app.checkpoint import load_checkpoint

    try:
        state = load_checkpoint(checkpoint)["optimizer"]["state"]
    except (OSError, KeyError, ValueError, RuntimeError):
        return None
    return sum(v.numel() * v.element_size() for entry in state.values() for v in entry.values()
               if isinstance(v, torch.Tensor))


def _train(args: argparse.Namespace, label: str, tokenizer, seed: int = 0) -> dict:
    preset = PRESETS[args.preset]
    rank = args.rank if args.rank is not None else preset.hidden_size // 4
    out = _label_dir(args, label, seed)
    argv = ["--preset", args.preset, "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
            "--grad-accum", str(args.grad_accum), "--steps", str(args.steps), "--lr", str(args.lr),
            "--eval-every", str(args.eval_every), "--eval-batches", str(args.eval_batches),
            "--rank", str(rank), "--alpha", str(args.alpha), "--sparsity", str(args.sparsity),
            "--seed", str(seed), "--threads", str(args.threads), "--out", str(out),
            "--save-every", str(args.eval_every), "--tokenizer", args.tokenizer, *RECIPES[label]]
    if args.data:
        argv += ["--data", *args.data]
    metrics_file = out / "metrics.json"
    if metrics_file.exists():
        done = json.loads(metrics_file.read_text())
        if done.get("steps_done") == args.steps and done["config"]["lr"] == args.lr:
            print(f"[{label}] reusing finished run in {out}")
            return done
    if (out / "checkpoint.pt").exists():
        argv.append("--resume")  # an interrupted comparison continues exactly where it stopped
    return run(parse_args(argv), tokenizer=tokenizer)


def _run_dir(args: argparse.Namespace) -> Path:
    # one folder per setting, so a finished run is reused only by a comparison with the same settings
    tag = f"{args.preset}_seq{args.seq_len}_b{args.batch_size}x{args.grad_accum}_s{args.steps}_lr{args.lr:g}"
    return Path(args.runs) / tag


def _row(run_id: str, label: str, metrics: dict, seed: int = 0, opt_bytes: int | None = None) -> dict:
    options = metrics["config"]["recipe_options"]
    return {
        "run_id": run_id, "device": metrics.get("device_name", device_name()), "threads": metrics["threads"],
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "git_rev": git_rev(),
        "recipe": label, "preset": metrics["config"]["preset"], "rank": options.get("rank", ""),
        "sparsity": options.get("sparsity", ""), "alpha": options.get("alpha", ""), "lr": metrics["config"]["lr"],
        "params_total": metrics["params_total"], "params_trainable": metrics["params_trainable"],
        "params_non_embedding": metrics["params_non_embedding"], "steps": metrics["steps_done"],
        "tokens": metrics["tokens_seen"], "final_val_loss": f"{metrics['final_val_loss']:.4f}",
        "final_val_ppl": f"{metrics['final_val_ppl']:.2f}", "wall_time_s": f"{metrics['wall_time_s']:.1f}",
        "seed": seed, "optimizer_state_bytes": "" if opt_bytes is None else opt_bytes,
    }


def _runs(csv_path: Path) -> list[list[dict]]:
    """Rows of the CSV grouped by ``run_id``, latest run first."""
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{csv_path} has no rows")
    order = list(dict.fromkeys(r["run_id"] for r in rows))[::-1]
    return [[r for r in rows if r["run_id"] == run_id] for run_id in order]


def _seeded(rows: list[dict]) -> bool:
    """Whether a run trained more than one seed per recipe."""
    return len({r.get("seed") or "0" for r in rows}) > 1


def _mb(value) -> str:
    return f"{int(value) / 2**20:.1f}" if value not in (None, "") else "-"


def seed_summary(rows: list[dict]) -> list[dict]:
    """Per recipe of one run (in first-seen order): seeds, mean / sample std / min / max of the final
    held-out perplexity, mean ratio to dense of the same seed, the parameter counts and optimizer state.

    >>> rows = [{"recipe": "dense", "seed": s, "final_val_ppl": p} for s, p in (("0", "10"), ("1", "12"))]
    >>> rows += [{"recipe": "lowrank", "seed": s, "final_val_ppl": p} for s, p in (("0", "15"), ("1", "12"))]
    >>> [(r["recipe"], r["mean"], round(r["std"], 3), r["ratio"]) for r in seed_summary(rows)]
    [('dense', 11.0, 1.414, 1.0), ('lowrank', 13.5, 2.121, 1.25)]
    """
    dense = {r.get("seed") or "0": float(r["final_val_ppl"]) for r in rows if r["recipe"] == "dense"}
    out = []
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        mine = [r for r in rows if r["recipe"] == recipe]
        ppl = [float(r["final_val_ppl"]) for r in mine]
        ratios = [float(r["final_val_ppl"]) / dense[r.get("seed") or "0"] for r in mine
                  if (r.get("seed") or "0") in dense]
        out.append({"recipe": recipe, "rows": mine, "seeds": [r.get("seed") or "0" for r in mine],
                    "mean": statistics.fmean(ppl), "std": statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
                    "min": min(ppl), "max": max(ppl), "ratio": statistics.fmean(ratios) if ratios else None})
    return out


def _seed_table(rows: list[dict]) -> list[str]:
    first = rows[0]
    summary = seed_summary(rows)
    lines = [
        f"## Run {first['run_id']}: {first['preset']} preset, lr {first.get('lr') or '?'}, {first['steps']} steps, "
        f"{int(first['tokens']):,} tokens each, seeds {', '.join(summary[0]['seeds'])}",
        "",
        f"Device: {first['device']}, {first['threads']} thread(s); {first['date']}; git {first['git_rev']}. "
        "Perplexity: mean ± sample standard deviation over the seeds (min-max); ppl / dense: mean over seeds "
        "of the ratio to dense of the same seed; optimizer state: bytes of AdamW's state tensors.",
        "",
        "| recipe | rank | sparsity | params total | params trainable | params non-embedding | optimizer state (MB) "
        "| seeds | final val ppl | min-max | ppl / dense | wall time (s, mean) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for item in summary:
        r = item["rows"][0]
        wall = statistics.fmean(float(x["wall_time_s"]) for x in item["rows"])
        ratio = f"{item['ratio']:.3f}" if item["ratio"] is not None else "n/a"
        lines.append(
            f"| {item['recipe']} | {r['rank'] or '-'} | {r['sparsity'] or '-'} | {int(r['params_total']):,} "
            f"| {int(r['params_trainable']):,} | {int(r['params_non_embedding']):,} "
            f"| {_mb(r.get('optimizer_state_bytes'))} | {len(item['rows'])} "
            f"| {item['mean']:.2f} ± {item['std']:.2f} | {item['min']:.2f}-{item['max']:.2f} | {ratio} | {wall:.1f} |"
        )
    return lines + [""]


def _table(rows: list[dict]) -> list[str]:
    if _seeded(rows):
        return _seed_table(rows)
    dense = next((r for r in rows if r["recipe"] == "dense"), None)
    first = rows[0]
    lines = [
        f"## Run {first['run_id']}: {first['preset']} preset, lr {first.get('lr') or '?'}, "
        f"{first['steps']} steps, "
        f"{int(first['tokens']):,} tokens each",
        "",
        f"Device: {first['device']}, {first['threads']} thread(s); {first['date']}; git {first['git_rev']}.",
        "",
        "| recipe | rank | sparsity | params total | params trainable | params non-embedding | steps | tokens "
        "| final val loss | final val ppl | ppl / dense | wall time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{float(r['final_val_ppl']) / float(dense['final_val_ppl']):.3f}" if dense else "n/a"
        lines.append(
            f"| {r['recipe']} | {r['rank'] or '-'} | {r['sparsity'] or '-'} | {int(r['params_total']):,} "
            f"| {int(r['params_trainable']):,} | {int(r['params_non_embedding']):,} | {r['steps']} "
            f"| {int(r['tokens']):,} | {r['final_val_loss']} | {r['final_val_ppl']} | {ratio} "
            f"| {r['wall_time_s']} |"
        )
    return lines + [""]


def _best_of_lrs(runs: list[list[dict]]) -> list[str]:
    """Each recipe at its best learning rate, over the runs that share the latest run's preset and tokens."""
    latest = runs[0][0]
    same = [rows for rows in runs if (rows[0]["preset"], rows[0]["steps"], rows[0]["tokens"])
            == (latest["preset"], latest["steps"], latest["tokens"])]
    lrs = sorted({rows[0].get("lr") for rows in same})
    if len(lrs) < 2:
        return []
    best: dict[str, dict] = {}
    for rows in same:
        for r in rows:
            if r["recipe"] not in best or float(r["final_val_ppl"]) < float(best[r["recipe"]]["final_val_ppl"]):
                best[r["recipe"]] = r
    dense = best.get("dense")
    lines = [
        f"## Each recipe at its best learning rate (of {', '.join(lrs)}): {latest['preset']}, "
        f"{int(latest['tokens']):,} tokens",
        "",
        "| recipe | best lr | params non-embedding | final val ppl | ppl / dense |",
        "|---|---:|---:|---:|---:|",
    ]
    for recipe, r in best.items():
        ratio = f"{float(r['final_val_ppl']) / float(dense['final_val_ppl']):.3f}" if dense else "n/a"
        lines.append(
            f"| {recipe} | {r['lr']} | {int(r['params_non_embedding']):,} | {r['final_val_ppl']} | {ratio} |"
        )
    return lines + [""]


def curves_name(row: dict) -> str:
    """The metrics JSON a row's curves were copied to (rows written before seeds have no seed suffix)."""
    seed = row.get("seed")
    suffix = f"_seed{seed}" if seed not in (None, "") else ""
    return f"pretrain_compare_{row['run_id']}_{row['recipe']}{suffix}.json"


def _plot_band(ax, results: Path, rows: list[dict]) -> None:
    """Mean held-out perplexity per recipe over the seeds, with the min-max band."""
    for item in seed_summary(rows):
        curves = []
        for r in item["rows"]:
            path = results / curves_name(r)
            if path.exists():
                evals = json.loads(path.read_text())["evals"]
                curves.append({e["step"]: e["val_ppl"] for e in evals})
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not steps:
            continue
        values = [[c[s] for c in curves] for s in steps]
        line, = ax.plot(steps, [statistics.fmean(v) for v in values], "o-", ms=3,
                        label=f"{item['recipe']} ({int(item['rows'][0]['params_non_embedding']) / 1e6:.2f}M "
                              f"non-emb., {len(curves)} seeds)")
        ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=line.get_color(),
                        alpha=0.2, linewidth=0)


def write_report(results: Path) -> None:
    """Markdown tables (every run, latest first) and the perplexity plot (latest three runs) from the CSV."""
    runs = _runs(results / "pretrain_compare.csv")
    lines = [
        "# Pre-training comparison: SLTrain vs dense vs low-rank-only",
        "",
        "Same preset, seed (each seed, in a run of several), data order, schedule and tokens for every recipe "
        "of a run; corpus: Python 3.11 "
        "documentation sources, held-out split by whole document; rank = hidden/4, sparsity 0.03, alpha 32; "
        "the low-rank-only baseline starts with both factors random. The paper trains 60M on 1.1B tokens: "
        "these CPU runs see ~10^-4 of that, i.e. early training. Generated by `benchmarks/pretrain_compare.py` "
        "from `pretrain_compare.csv` (do not edit by hand).",
        "",
    ]
    lines += _best_of_lrs(runs)
    for rows in runs:
        lines += _table(rows)
    (results / "pretrain_compare.md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = runs[:3][::-1]
    fig, axes = plt.subplots(1, len(shown), figsize=(6.5 * len(shown), 4.5), squeeze=False, sharey=True)
    for ax, rows in zip(axes[0], shown, strict=True):
        first = rows[0]
        if _seeded(rows):
            _plot_band(ax, results, rows)
        for r in rows if not _seeded(rows) else []:
            path = results / curves_name(r)
            if not path.exists():
                continue
            evals = json.loads(path.read_text())["evals"]
            ax.plot([e["step"] for e in evals], [e["val_ppl"] for e in evals], "o-", ms=3,
                    label=f"{r['recipe']} ({int(r['params_non_embedding']) / 1e6:.2f}M non-emb.)")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        band = f", mean and min-max of {len(seed_summary(rows)[0]['rows'])} seeds" if _seeded(rows) else ""
        ax.set_title(f"{first['preset']}, lr {first.get('lr') or '?'}, {int(first['tokens']):,} tokens per run{band}",
                     fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel("held-out perplexity")
    fig.tight_layout()
    fig.savefig(results / "pretrain_compare.png", dpi=110)
    plt.close(fig)


def append_rows(csv_path: Path, rows: list[dict]) -> None:
    """Append ``rows`` to the CSV. A CSV written before the seed columns existed gets them added to its header
    line only: its earlier rows stay byte for byte (a reader gives them empty seed / optimizer state)."""
    if csv_path.exists():
        data = csv_path.read_bytes()  # bytes: the rows' line endings stay as they are
        first, sep, rest = data.partition(b"\n")
        header = next(csv.reader([first.decode().rstrip("\r")]), [])
        if header != FIELDS:
            if header != FIELDS[:len(header)]:
                raise SystemExit(f"{csv_path} has columns {header}, not a prefix of {FIELDS}: not appending")
            csv_path.write_bytes(",".join(FIELDS).encode() + (b"\r" if first.endswith(b"\r") else b"") + sep + rest)
    new_file = not csv_path.exists()
    with open(csv_path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        write_report(results)
        return
    require_clean_tree(args.allow_dirty)
    from fxsparse.app.pretrain import _load_tokenizer

    tokenizer = _load_tokenizer(args.tokenizer)
    # the settings tag keeps two comparisons started in the same second (say, two learning rates) apart
    run_id = f"{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%S')}_{_run_dir(args).name}"
    rows = []
    for seed in args.seeds:  # seed by seed: an interrupted comparison has every recipe of its first seeds
        for label in args.recipes:
            metrics = _train(args, label, tokenizer, seed)
            metrics["device_name"] = device_name()
            opt_bytes = optimizer_state_bytes(_label_dir(args, label, seed) / "checkpoint.pt")
            row = _row(run_id, label, metrics, seed, opt_bytes)
            shutil.copyfile(_label_dir(args, label, seed) / "metrics.json", results / curves_name(row))
            rows.append(row)
            print(f"[{label} seed {seed}] final val ppl {metrics['final_val_ppl']:.2f} "
                  f"(loss {metrics['final_val_loss']:.4f}, {metrics['wall_time_s']:.0f} s)", flush=True)
    append_rows(results / "pretrain_compare.csv", rows)
    write_report(results)
    print((results / "pretrain_compare.md").read_text())
    if any(not math.isfinite(float(r["final_val_ppl"])) for r in rows):
        raise SystemExit("a run diverged (non-finite perplexity)")


if __name__ == "__main__":
    main()
