"""Scaling of S²FT vs PEFT LoRA vs full fine-tuning: step time and memory as sequence and trainable ratio grow.

Two sweeps on SmolLM2-135M-Instruct (float32, AdamW), each point one process-local side-by-side run of the
three providers (interleaved repeats after a warm-up step, medians), measured as in ``bench_s2ft.py``:

- ``seq``: batch 1 x 128, 256, 512, 1024 tokens; S²FT at its default ratios (``o`` 0.052, ``down`` 0.02),
  LoRA r=16 on q, k, v, o, gate, up, down (the settings of ``bench_s2ft.py``);
- ``ratio``: batch 1 x 256 tokens; S²FT's ``down`` ratio 0.01 -> 0.2 (``o`` stays 0.052), LoRA at the rank
  whose trainable count is nearest S²FT's at that point (``matched_rank``), full fine-tuning as the
  reference in every point.

Per provider and point: median / fastest step (wall) and median process CPU time, activations saved for
backward (unique storages, parameters excluded), the peak of live tensor memory in one step
(``LiveTensorPeak``: weights, gradients, optimizer state, activations, temporaries) and the same peak less
the weights, trainable parameters. Appends rows to ``benchmarks/results/scaling.csv`` (one ``run_id`` per
invocation) and redraws ``scaling_seq.png`` and ``scaling_ratio.png`` from the latest run of each sweep::

    python benchmarks/scaling.py                       # both sweeps, about 10-15 minutes on 2 busy cores
    python benchmarks/scaling.py --sweep seq --seqs 128,512
    python benchmarks/scaling.py --tiny                # tiny random LLaMA, a few seconds, writes nothing
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import sys
from pathlib import Path

import torch
from _env import append_rows, base_model, cpu_name, git_rev, load_average, read_rows, require_clean_tree
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_s2ft  # noqa: E402  (a sibling script: the providers and the measurements are the same)

RESULTS = HERE / "results"
CSV_NAME, SEQ_PNG, RATIO_PNG = "scaling.csv", "scaling_seq.png", "scaling_ratio.png"
PROVIDERS = ("s2ft", "lora", "full")
FIELDS = ["run_id", "date", "device", "git_rev", "torch", "threads", "model", "sweep", "batch", "seq",
          "s2ft_ratios", "lora_rank", "provider", "trainable_params", "median_ms", "min_ms", "cpu_ms",
          "ratio_to_lora", "ratio_to_full", "saved_mb", "saved_ratio_to_lora", "saved_ratio_to_full", "peak_mb",
          "peak_extra_mb", "repeats", "load_avg"]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def ratios_text(ratios: dict[str, float]) -> str:
    """``{"o": 0.052, "down": 0.02}`` -> ``"o=0.052,down=0.02"`` (the CSV's ``s2ft_ratios``).

    >>> ratios_text({"o": 0.052, "down": 0.2})
    'o=0.052,down=0.2'
    """
    return ",".join(f"{k}={v:g}" for k, v in ratios.items())


def build_s2ft(base: nn.Module, ratios: dict[str, float]) -> nn.Module:
    import fxsparse

    return fxsparse.transform(copy.deepcopy(base), recipe="s2ft", ratios=dict(ratios))


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def measure_point(runners: list[bench_s2ft.Runner], batch: dict, repeats: int, warmup: int) -> dict[str, dict]:
    """Interleaved timing and memory of ``runners`` on ``batch``: ``{provider: measurements}``."""
    for runner in runners:
        runner.times, runner.cpu_times = [], []
    saved = {r.name: r.saved_bytes_and_flops(batch)[0] for r in runners}
    for _ in range(max(1, warmup)):  # AdamW's state exists before the peak is measured
        for runner in runners:
            runner.step(batch)
    peaks = {r.name: r.peak_memory(batch) for r in runners}
    for _ in range(repeats):
        for runner in runners:
            wall, cpu = runner.step(batch)
            runner.times.append(wall)
            runner.cpu_times.append(cpu)
    out = {}
    for r in runners:
        out[r.name] = {"median": statistics.median(r.times), "min": min(r.times),
                       "cpu": statistics.median(r.cpu_times), "saved": saved[r.name], "peak": peaks[r.name][0],
                       "peak_extra": peaks[r.name][1], "trainable": _trainable(r.model)}
    return out


def point_rows(measured: dict[str, dict], common: dict) -> list[dict]:
    """CSV rows of one point, ratios to LoRA and full from the same point (blank where one is missing)."""

    def ratio(name: str, ref: str, key: str) -> str:
        if ref not in measured or not measured[ref][key]:
            return ""
        return f"{measured[name][key] / measured[ref][key]:.3f}"

    rows = []
    for name, m in measured.items():
        rows.append({**common, "provider": name, "trainable_params": m["trainable"],
                     "median_ms": f"{1e3 * m['median']:.1f}", "min_ms": f"{1e3 * m['min']:.1f}",
                     "cpu_ms": f"{1e3 * m['cpu']:.1f}", "ratio_to_lora": ratio(name, "lora", "median"),
                     "ratio_to_full": ratio(name, "full", "median"), "saved_mb": f"{m['saved'] / 2**20:.2f}",
                     "saved_ratio_to_lora": ratio(name, "lora", "saved"),
                     "saved_ratio_to_full": ratio(name, "full", "saved"), "peak_mb": f"{m['peak'] / 2**20:.1f}",
                     "peak_extra_mb": f"{m['peak_extra'] / 2**20:.2f}"})
    return rows


def _batch(vocab: int, batch: int, seq: int) -> dict:
    generator = torch.Generator().manual_seed(seq)
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    return {"input_ids": ids, "labels": ids}


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base, model_name = base_model(args.tiny)
    vocab = base.config.vocab_size
    run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    meta = {"run_id": run_id, "device": cpu_name(), "git_rev": git_rev(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "model": model_name, "batch": args.batch, "repeats": args.repeats}
    rows: list[dict] = []
    full = bench_s2ft.Runner("full", bench_s2ft.build_full(base)) if "full" in args.providers else None

    def runners_for(s2ft_model: nn.Module, rank: int) -> list[bench_s2ft.Runner]:
        made = []
        for name in args.providers:
            if name == "s2ft":
                made.append(bench_s2ft.Runner("s2ft", s2ft_model, "transform"))
            elif name == "lora":
                made.append(bench_s2ft.Runner("lora", bench_s2ft.build_lora(base, rank)))
            else:
                made.append(full)
        return made

    def record(sweep: str, seq: int, ratios: dict[str, float], rank: int, runners) -> None:
        load_before = load_average()
        measured = measure_point(runners, _batch(vocab, args.batch, seq), args.repeats, args.warmup)
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
        common = {**meta, "date": date, "sweep": sweep, "seq": seq, "s2ft_ratios": ratios_text(ratios),
                  "lora_rank": rank, "load_avg": f"{load_before:.1f}-{load_average():.1f}"}
        new = point_rows(measured, common)
        rows.extend(new)
        print(f"{sweep} seq={seq} {ratios_text(ratios)} lora r={rank}: "
              + "  ".join(f"{r['provider']} {r['median_ms']} ms {r['saved_mb']} MB saved "
                          f"({r['trainable_params']:,} trained)" for r in new), flush=True)

    if args.sweep in ("seq", "both"):
        ratios = dict(bench_s2ft.DEFAULT_RATIOS)
        runners = runners_for(build_s2ft(base, ratios), args.lora_rank)
        for seq in args.seqs:
            record("seq", seq, ratios, args.lora_rank, runners)
        del runners
    if args.sweep in ("ratio", "both"):
        for down in args.down_ratios:
            ratios = {"o": bench_s2ft.DEFAULT_RATIOS["o"], "down": down}
            s2ft_model = build_s2ft(base, ratios)
            rank = bench_s2ft.matched_rank(base, _trainable(s2ft_model))
            record("ratio", args.ratio_seq, ratios, rank, runners_for(s2ft_model, rank))
            del s2ft_model
    return rows


# ---------------------------------------------------------------- results files


def append_csv(path: Path, rows: list[dict]) -> None:
    append_rows(path, FIELDS, rows)


def read_csv(path: Path) -> list[dict]:
    return read_rows(path)


def latest(rows: list[dict], sweep: str) -> list[dict]:
    """The rows of ``sweep`` from the last run that measured it."""
    mine = [r for r in rows if r["sweep"] == sweep]
    return [r for r in mine if r["run_id"] == mine[-1]["run_id"]] if mine else []


def write_plots(rows: list[dict], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    written = []
    for sweep, name, xlabel in (("seq", SEQ_PNG, "sequence length (tokens)"),
                                ("ratio", RATIO_PNG, "S²FT trainable parameters (LoRA rank matched)")):
        picked = latest(rows, sweep)
        if not picked:
            continue
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        # the ratio sweep's x: S²FT's trainable count at that point, for every provider of the point
        s2ft_count = {r["s2ft_ratios"]: float(r["trainable_params"]) for r in picked if r["provider"] == "s2ft"}
        for provider in dict.fromkeys(r["provider"] for r in picked):
            mine = [r for r in picked if r["provider"] == provider]
            xs = [float(r["seq"]) if sweep == "seq" else s2ft_count.get(r["s2ft_ratios"], float(r["trainable_params"]))
                  for r in mine]
            for ax, key in zip(axes, ("median_ms", "saved_mb", "peak_extra_mb"), strict=True):
                ax.plot(xs, [float(r[key]) for r in mine], marker="o", label=provider)
        axes[0].set_ylabel("median step time (ms)")
        axes[1].set_ylabel("activations saved for backward (MB)")
        axes[2].set_ylabel("peak live memory less weights (MB)")
        for ax in axes:
            ax.set_xlabel(xlabel)
            ax.set_xscale("log", base=2 if sweep == "seq" else 10)
            if sweep == "seq":
                ax.set_xticks(sorted({int(r["seq"]) for r in picked}))
                ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
                ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        first = picked[0]
        fig.suptitle(f"{first['model']}, {first['threads']} threads, {first['device']}, {first['date']} "
                     f"({first['git_rev']})", fontsize=9)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        written.append(folder / name)
    return written


def _providers(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or any(n not in PROVIDERS for n in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"providers must be distinct names among {','.join(PROVIDERS)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", choices=["seq", "ratio", "both"], default="both")
    p.add_argument("--seqs", type=_ints, default=None, help="default 128,256,512,1024 (16,32 with --tiny)")
    p.add_argument("--down-ratios", type=_floats, default=None,
                   help="S²FT down ratios of the ratio sweep (default 0.01,0.02,0.05,0.1,0.2; 0.05,0.2 with --tiny)")
    p.add_argument("--ratio-seq", type=int, default=None, help="tokens per sequence in the ratio sweep (256)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA rank of the seq sweep (16; 4 with --tiny)")
    p.add_argument("--providers", type=_providers, default=list(PROVIDERS))
    p.add_argument("--repeats", type=int, default=None, help="timed steps per provider and point (3; 1 --tiny)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="tiny random LLaMA smoke run; writes nothing unless --out")
    p.add_argument("--dry-run", action="store_true", help="print the rows, write no results files")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--allow-dirty", action="store_true",
                   help="record results from a checkout with uncommitted changes (tagged -dirty)")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.seqs = args.seqs or ([16, 32] if tiny else [128, 256, 512, 1024])
    args.down_ratios = args.down_ratios or ([0.05, 0.2] if tiny else [0.01, 0.02, 0.05, 0.1, 0.2])
    args.ratio_seq = args.ratio_seq or (32 if tiny else 256)
    args.lora_rank = args.lora_rank or (4 if tiny else 16)
    args.repeats = args.repeats or (1 if tiny else 3)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    folder = (args.out or RESULTS).resolve()
    writes = not args.dry_run and (args.out is not None or not args.tiny)
    if writes and args.out is None:
        require_clean_tree(args.allow_dirty)
    rows = run(args)
    if not writes:
        return
    path = folder / CSV_NAME
    append_csv(path, rows)
    plots = write_plots(read_csv(path), folder)
    print(f"wrote {path}" + "".join(f", {p.name}" for p in plots))


if __name__ == "__main__":
    main()
