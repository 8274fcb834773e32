"""The README's "Results" section, generated from the committed CSVs under ``benchmarks/results/``.

Every figure in that section comes from a CSV row that a committed benchmark wrote (device, date and git
revision in the row); this script picks each benchmark's latest run on a clean tree (rows tagged ``-dirty``
are left out), writes the section between the
``<!-- results:begin -->`` / ``<!-- results:end -->`` markers of ``README.md``, and draws ``compile.png``
(the other two plots are drawn by their own benchmarks). ``--check`` only compares: it fails when the README
says something the CSVs do not (CI runs it, ``tests/benchmarks/test_readme_results.py``).

    python benchmarks/readme_results.py            # rewrite the section (and compile.png)
    python benchmarks/readme_results.py --check    # exit 1 if the README is out of date
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE.parent / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _rows(name: str) -> list[dict[str, str]]:
    path = RESULTS / name
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _latest(rows: list[dict[str, str]], key: Callable[[dict[str, str]], tuple]) -> list[dict[str, str]]:
    """The rows of the last run measured on committed code (rows sharing ``key``; runs are appended in time
    order). Rows whose ``git_rev`` ends in ``-dirty`` stay in the CSVs and their tables, never in the README."""
    clean = [r for r in rows if not r.get("git_rev", "").endswith("-dirty")]
    if not clean:
        return []
    last = key(clean[-1])
    return [r for r in clean if key(r) == last]


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in body]


def _provenance(row: dict[str, str], command: str, csv_name: str) -> str:
    return (f"Run of {row['date']} at `{row['git_rev']}` on {row['device']}, {row.get('threads', '?')} threads "
            f"(`{command}`, rows in `benchmarks/results/{csv_name}`).")


def s2ft_section() -> list[str]:
    rows = _latest(_rows("s2ft_vs_lora.csv"), lambda r: (r["date"], r["git_rev"]))
    if not rows:
        return []
    body = [[r["provider"], f"{float(r['median_ms']):.0f}", r.get("min_ms") or "", r["ratio_to_lora"],
             r["ratio_to_full"], r["saved_mb"], r["saved_ratio_to_full"], r.get("peak_mb") or "",
             f"{int(r['trainable_params']):,}"] for r in rows]
    return ["### S²FT vs PEFT LoRA vs full fine-tuning (SmolLM2-135M, one training step)", "",
            _provenance(rows[0], "python benchmarks/bench_s2ft.py", "s2ft_vs_lora.csv") + " Batch "
            f"{rows[0]['batch']} x {rows[0]['seq']}, AdamW, median over interleaved repeats.", "",
            "`fastest ms`: the fastest step (the least disturbed by other load on a shared machine); `peak MB`: "
            "peak of live tensors in the step (weights, optimizer state and activations; see the script).", "",
            *_table(["provider", "step ms", "fastest ms", "x LoRA", "x full", "saved MB", "saved x full", "peak MB",
                     "trainable"], body),
            "", "![S²FT vs LoRA vs full](benchmarks/results/s2ft_vs_lora.png)", ""]


def compile_section() -> list[str]:
    rows = _latest(_rows("compile.csv"), lambda r: (r["date"], r["git_rev"]))
    if not rows:
        return []
    body = [[r["provider"], f"{float(r['median_ms']):.0f}", r["ratio_to_floor"], r["ratio_to_lora_inductor"],
             r["gemm_limit_to_floor"], r["saved_mb"], r["saved_ratio_to_full"]] for r in rows]
    return ["### `torch.compile` backends (same model and batch)", "",
            _provenance(rows[0], "python benchmarks/bench_compile.py", "compile.csv") + " The floor trains no "
            "weight at all (backward only to the embedding output); `GEMM limit` is the ratio a provider would "
            "reach if everything but its matrix products were free.", "",
            *_table(["provider", "step ms", "x floor", "x LoRA+inductor", "GEMM limit", "saved MB", "saved x full"],
                    body),
            "", "![compile backends](benchmarks/results/compile.png)", ""]


def sltrain_section() -> list[str]:
    rows = _latest(_rows("sltrain_block.csv"), lambda r: (r["date"], r["git_rev"]))
    if not rows:
        return []
    body = [[r["provider"], f"{float(r['median_ms']):.0f}", r["ratio_to_dense"], r["param_ratio"],
             r["linear_gflop"]] for r in rows]
    return ["### SLTrain block vs dense (one 350M-shaped LLaMA block)", "",
            _provenance(rows[0], "python benchmarks/bench_sltrain_block.py", "sltrain_block.csv")
            + f" Shape {rows[0]['shape']}.", "",
            *_table(["provider", "step ms", "x dense", "params x dense", "linear GFLOP"], body), ""]


def scaling_section() -> list[str]:
    rows = _latest([r for r in _rows("scaling.csv") if r.get("sweep") == "seq"], lambda r: (r["run_id"],))
    if not rows:
        return []
    seqs = sorted({int(r["seq"]) for r in rows})
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    cell = {(r["provider"], int(r["seq"])): r for r in rows}

    def fmt(provider: str, seq: int) -> str:
        r = cell.get((provider, seq))
        return f"{float(r['median_ms']):.0f} ms / {float(r['saved_mb']):.0f} MB" if r else ""

    body = [[p, *(fmt(p, q) for q in seqs)] for p in providers]
    first = rows[0]
    return ["### Step time and saved activations against sequence length", "",
            f"Run `{first['run_id']}` of {first['date']} at `{first['git_rev']}` on {first['device']}, "
            f"{first['threads']} threads (`python benchmarks/scaling.py --sweep seq`, rows in "
            f"`benchmarks/results/scaling.csv`): SmolLM2-135M, batch {first['batch']}, S²FT at "
            f"{first['s2ft_ratios']}, LoRA r={first['lora_rank']}; median step / activations saved for backward.", "",
            *_table(["provider", *(f"{q} tokens" for q in seqs)], body),
            "", "![scaling with sequence length](benchmarks/results/scaling_seq.png)", ""]


def scaling_ratio_section() -> list[str]:
    rows = _latest([r for r in _rows("scaling.csv") if r.get("sweep") == "ratio"], lambda r: (r["run_id"],))
    if not rows:
        return []
    points = list(dict.fromkeys(r["s2ft_ratios"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    cell = {(r["provider"], r["s2ft_ratios"]): r for r in rows}

    def fmt(provider: str, point: str) -> str:
        r = cell.get((provider, point))
        if r is None:
            return ""
        rank = f" (r={r['lora_rank']})" if provider == "lora" else ""
        return f"{float(r['median_ms']):.0f} ms / {float(r['saved_mb']):.0f} MB{rank}"

    body = [[p, *(fmt(p, q) for q in points)] for p in providers]
    first = rows[0]
    return ["### Step time and saved activations against the trainable budget", "",
            f"Run `{first['run_id']}` of {first['date']} at `{first['git_rev']}` on {first['device']}, "
            f"{first['threads']} threads (`python benchmarks/scaling.py --sweep ratio`, rows in "
            f"`benchmarks/results/scaling.csv`): SmolLM2-135M, batch {first['batch']} x {first['seq']}, S²FT's "
            "down ratio grows, LoRA's rank is the one nearest S²FT's trainable count; median step / saved.", "",
            *_table(["provider", *points], body),
            "", "![scaling with the trainable ratio](benchmarks/results/scaling_ratio.png)", ""]


def pretrain_section() -> list[str]:
    rows = _latest(_rows("pretrain_compare.csv"), lambda r: (r["run_id"],))
    if not rows:
        return []
    if len({r.get("seed") or "0" for r in rows}) > 1:
        return _pretrain_seeds(rows)
    body = [[r["recipe"], f"{int(r['params_trainable']):,}", r["steps"], f"{int(r['tokens']):,}",
             r["final_val_loss"], r["final_val_ppl"]] for r in rows]
    first = rows[0]
    return ["### Pre-training from scratch: SLTrain vs dense vs low-rank", "",
            f"Run `{first['run_id']}` of {first['date']} at `{first['git_rev']}` on {first['device']}, "
            f"{first['threads']} threads (`python benchmarks/pretrain_compare.py`, rows in "
            "`benchmarks/results/pretrain_compare.csv`), preset " f"{first['preset']}, learning rate {first['lr']}, "
            "one seed; early training only.", "",
            *_table(["recipe", "parameters", "steps", "tokens", "val loss", "val ppl"], body),
            "", "![pre-training curves](benchmarks/results/pretrain_compare.png)", ""]


def _pretrain_seeds(rows: list[dict[str, str]]) -> list[str]:
    from pretrain_compare import seed_summary

    summary = seed_summary(rows)
    first = rows[0]
    body = []
    for item in summary:
        mine = item["rows"]
        state = [int(r["optimizer_state_bytes"]) for r in mine if r.get("optimizer_state_bytes")]
        body.append([item["recipe"], f"{int(mine[0]['params_trainable']):,}",
                     f"{sum(state) / len(state) / 2**20:.1f}" if state else "-", str(len(mine)),
                     f"{item['mean']:.2f} ± {item['std']:.2f}", f"{item['min']:.2f}-{item['max']:.2f}",
                     f"{item['ratio']:.3f}" if item["ratio"] is not None else "-"])
    return ["### Pre-training from scratch: SLTrain vs dense vs low-rank", "",
            f"Run `{first['run_id']}` of {first['date']} at `{first['git_rev']}` on {first['device']}, "
            f"{first['threads']} thread(s) (`python benchmarks/pretrain_compare.py --seeds "
            f"{','.join(summary[0]['seeds'])}`, rows in `benchmarks/results/pretrain_compare.csv`), preset "
            f"{first['preset']}, learning rate {first['lr']}, {first['steps']} steps and {int(first['tokens']):,} "
            "tokens per run, the same data order per seed; held-out perplexity mean ± sample std over the seeds "
            "(the seed draws the initial weights, SLTrain's random support and the data order); ppl / dense: mean "
            "over seeds of the ratio to dense of the same seed. Early training only.", "",
            *_table(["recipe", "trainable", "AdamW state MB", "seeds", "val ppl", "min-max", "ppl / dense"], body),
            "", "![pre-training curves](benchmarks/results/pretrain_compare.png)", ""]


def quality_section() -> list[str]:
    rows = _latest(_rows("finetune_quality.csv"), lambda r: (r["run_id"],))
    if not rows:
        return []
    from finetune_quality import summary

    first = rows[0]
    metrics = ("test_em", "longer_em", "format_em", "ppl_change")
    body = [[item["method"], f"{int(item['trainable_params']):,}", item["lr"] or "-", str(item["n"]),
             *(f"{item[k]:.3f} ± {item[k + '_std']:.3f}" for k in metrics)] for item in summary(rows)]
    return ["### Fine-tuning quality at a matched trainable budget", "",
            f"Run `{first['run_id']}` of {first['date']} at `{first['git_rev']}` on {first['device']}, "
            f"{first['threads']} thread(s) (`python benchmarks/finetune_quality.py`, rows in "
            f"`benchmarks/results/finetune_quality.csv`): {first['model']}, task `{first['task']}`, "
            f"{first['steps']} steps of {first['batch_size']} examples; every method at S²FT's "
            f"{int(first['budget_params']):,} trainable parameters but `full`; learning rate chosen per method on a "
            "validation split (first seed), then mean ± sample std over the seeds. Exact match in distribution "
            "(test), with longer operands and in an unseen prompt format (out of distribution); forgetting: "
            "general-text perplexity after / before - 1 (lower forgets less).", "",
            *_table(["method", "trainable", "lr", "seeds", "test EM", "longer EM", "format EM", "ppl change"], body),
            "", "![fine-tuning quality](benchmarks/results/finetune_quality.png)", ""]


def zoo_section() -> list[str]:
    rows = _rows("zoo.csv")
    if not rows or "status" not in rows[0]:
        return []
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    in_scope = sum(counts.get(k, 0) for k in ("pass", "fail", "inexact"))
    order = ("pass", "fail", "inexact", "out-of-scope", "cannot-build")
    body = [[status, str(counts.get(status, 0)),
             f"{100 * counts.get(status, 0) / in_scope:.0f}% of in scope" if status in order[:3] and in_scope else ""]
            for status in order]
    return ["### Structure discovery across the transformers zoo", "",
            f"Every causal-LM architecture of transformers built tiny and random ({len(rows)} architectures; "
            "`python benchmarks/zoo.py`, rows in `benchmarks/results/zoo.csv`, stage and reason per architecture in "
            "`zoo.md`). `pass`: inspect matches the config, S²FT with every projection selected and merge are "
            "exact; `inexact`: a changed function (never acceptable).", "",
            *_table(["status", "architectures", "share"], body), ""]


SECTIONS = (s2ft_section, compile_section, scaling_section, scaling_ratio_section, sltrain_section, quality_section,
            pretrain_section, zoo_section)


def section() -> str:
    lines = [BEGIN, "<!-- generated by benchmarks/readme_results.py from benchmarks/results/*.csv: edit those -->", ""]
    for make in SECTIONS:
        lines += make()
    lines.append(END)
    return "\n".join(lines)


def replace_section(readme: str, new: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} markers to write between")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + new + tail


def plot_compile(path: Path) -> None:
    rows = _latest(_rows("compile.csv"), lambda r: (r["date"], r["git_rev"]))
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = [r["provider"] for r in rows]
    left.barh(names, [float(r["ratio_to_floor"]) for r in rows], color="tab:blue", label="measured")
    left.scatter([float(r["gemm_limit_to_floor"]) for r in rows], names, color="black", zorder=3, marker="|",
                 s=200, label="GEMM limit")
    left.axvline(1.0, color="grey", lw=0.8)
    left.set_xlabel("step time / floor")
    left.legend(fontsize=8)
    right.barh(names, [float(r["saved_mb"]) for r in rows], color="tab:orange")
    right.set_xlabel("activations saved for backward (MB)")
    right.set_yticks([])
    fig.suptitle(f"SmolLM2-135M, {rows[0]['batch']}x{rows[0]['seq']}, {rows[0]['device']}, {rows[0]['date']} "
                 f"({rows[0]['git_rev']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md differs from the CSVs")
    args = parser.parse_args(argv)
    readme = README.read_text()
    updated = replace_section(readme, section())
    if args.check:
        if updated != readme:
            print("README.md's results section is out of date: run python benchmarks/readme_results.py",
                  file=sys.stderr)
            return 1
        print("README.md's results section matches benchmarks/results/*.csv")
        return 0
    README.write_text(updated)
    plot_compile(RESULTS / "compile.png")
    print(f"wrote the results section of {README.name} and {RESULTS / 'compile.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
