"""S²FT vs PEFT LoRA vs full fine-tuning: step time and saved activations on SmolLM2-135M, side by side.

One process, one base model (SmolLM2-135M-Instruct, float32), batch 2 x 128 tokens, AdamW. Providers:

- ``s2ft``: ``fxsparse.transform(model, recipe="s2ft")`` with the default ratios (``o`` 0.052, ``down``
  0.02; columns of O and Down, units drawn from one pool across all blocks) and gated FFNs that
  recompute ``act(gate)`` in backward. With ``--builder local`` (or when the recipe is not available) the
  same model is built here from the passes: ``select_units`` -> ``permute_coupled`` -> ``replace_s2ft``
  -> ``recompute_gated_act``;
- ``lora``: PEFT LoRA, r=16, alpha=32, no dropout, on q, k, v, o, gate, up, down;
- ``full``: every parameter trains.

A step is forward + LM-loss backward + ``optimizer.step()`` + ``zero_grad``. Repeats are interleaved
(one step of each provider per round, after warm-up steps) and medians reported, with the ratios
S²FT/LoRA and S²FT/full from the same run, for wall time and for process CPU time (the machine may be
shared; the 1-minute load average is recorded with each row), and the fastest step of each. ``saved MB``
is the activation memory autograd keeps for backward in one step: unique storages packed by
``saved_tensors_hooks``, parameters and buffers excluded. ``counted GFLOP`` is the forward + backward
arithmetic of one step as ``FlopCounterMode`` counts it (matmuls and attention, from shapes: unaffected
by other load on the machine). ``GFLOP/s`` counts 6 N T for full fine-tuning and 4 N T for S²FT and
LoRA (N parameters, T tokens): the arithmetic limit the ratio to full cannot beat by much.

Appends one row per provider to ``benchmarks/results/s2ft_vs_lora.csv`` and regenerates
``s2ft_vs_lora.md`` and ``s2ft_vs_lora.png`` from the whole CSV::

    python benchmarks/bench_s2ft.py                  # SmolLM2-135M, a few minutes on 2 cores
    python benchmarks/bench_s2ft.py --tiny           # smoke run on a tiny random LLaMA, writes nothing
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import statistics
import time
from pathlib import Path

import torch
from _env import cpu_name, git_rev, load_average, require_clean_tree
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fxsparse
from fxsparse.memory import SavedActivations

RESULTS = Path(__file__).resolve().parent / "results"
CSV_PATH = RESULTS / "s2ft_vs_lora.csv"
MD_PATH = RESULTS / "s2ft_vs_lora.md"
PNG_PATH = RESULTS / "s2ft_vs_lora.png"
DEFAULT_RATIOS = {"o": 0.052, "down": 0.02}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FIELDS = ["date", "device", "git_rev", "torch", "threads", "model", "batch", "seq", "provider", "builder",
          "median_ms", "ratio_to_lora", "ratio_to_full", "cpu_ms", "cpu_ratio_to_lora", "cpu_ratio_to_full",
          "min_ms", "min_ratio_to_lora", "min_ratio_to_full", "saved_mb", "saved_ratio_to_lora",
          "saved_ratio_to_full", "trainable_params", "gflops_per_s", "counted_gflop", "flop_ratio_to_lora",
          "flop_ratio_to_full", "repeats", "load_avg"]


# ---------------------------------------------------------------- providers


def build_s2ft(base: nn.Module, builder: str) -> tuple[nn.Module, str]:
    """The S²FT model and how it was built (``transform`` or ``local``)."""
    model = copy.deepcopy(base)
    if builder in ("auto", "transform"):
        try:
            return fxsparse.transform(model, recipe="s2ft", ratios=dict(DEFAULT_RATIOS)), "transform"
        except ValueError as exc:
            if builder == "transform" or "unknown recipe" not in str(exc):
                raise
        except ModuleNotFoundError:
            if builder == "transform":
                raise
        model = copy.deepcopy(base)
    return _build_s2ft_locally(model), "local"


def _build_s2ft_locally(model: nn.Module) -> nn.Module:
    from fxsparse.passes.permute_coupled import permute_coupled
    from fxsparse.passes.recompute_gated_act import recompute_gated_act
    from fxsparse.passes.replace_s2ft import replace_s2ft
    from fxsparse.passes.select_units import select_units

    structure = fxsparse.inspect(model)
    plan = select_units(structure=structure, model=model, ratios=DEFAULT_RATIOS, seed=0).outputs["plan"]
    perms = permute_coupled(model=model, structure=structure, plan=plan).outputs["perms"]
    replace_s2ft(model=model, structure=structure, plan=plan, perms=perms)
    recompute_gated_act(model=model, structure=structure)
    return model


def build_lora(base: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                        task_type="CAUSAL_LM")
    return get_peft_model(copy.deepcopy(base), config)


def build_full(base: nn.Module) -> nn.Module:
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ---------------------------------------------------------------- measurement


class Runner:
    """One provider: model, AdamW over its trainable parameters, and a timed training step."""

    def __init__(self, name: str, model: nn.Module, builder: str = ""):
        self.name, self.model, self.builder = name, model.train(), builder
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5)
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def step(self, batch: dict) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) of one training step."""
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, time.process_time() - cpu_start

    def saved_bytes_and_flops(self, batch: dict) -> tuple[int, int]:
        """Activation bytes saved for backward, and FLOPs of forward + backward (``FlopCounterMode``:
        matmuls and attention, counted from shapes, so independent of machine load)."""
        # Parameters and buffers (rotary tables, S²FT index) are not activations.
        with FlopCounterMode(display=False) as counter:
            with SavedActivations(exclude=[*self.model.parameters(), *self.model.buffers()]) as saved:
                loss = self.model(**batch).loss
            loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        return saved.bytes, counter.get_total_flops()


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.tiny:
        from fxsparse.models import tiny_model

        base, model_name = tiny_model("llama"), "tiny-llama"
    else:
        from fxsparse.app.models import load_default_model

        base, _ = load_default_model()
        model_name = "SmolLM2-135M-Instruct"
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=generator)
    batch = {"input_ids": ids, "labels": ids}
    n_params = sum(p.numel() for p in base.parameters())
    tokens = args.batch * args.seq

    s2ft_model, builder = build_s2ft(base, args.builder)
    runners = [Runner("s2ft", s2ft_model, builder), Runner("lora", build_lora(base)),
               Runner("full", build_full(base))]
    del base
    for runner in runners:
        print(f"{runner.name}: {sum(p.numel() for p in runner.params):,} trainable params", flush=True)
    measured = {r.name: r.saved_bytes_and_flops(batch) for r in runners}
    saved = {name: value[0] for name, value in measured.items()}
    counted = {name: value[1] for name, value in measured.items()}
    for _ in range(args.warmup):
        for runner in runners:
            runner.step(batch)
    load_before = load_average()
    for i in range(args.repeats):
        for runner in runners:
            wall, cpu = runner.step(batch)
            runner.times.append(wall)
            runner.cpu_times.append(cpu)
        print(f"round {i + 1}/{args.repeats}: "
              + "  ".join(f"{r.name} {1e3 * r.times[-1]:.0f} ms" for r in runners), flush=True)

    median = {r.name: statistics.median(r.times) for r in runners}
    cpu = {r.name: statistics.median(r.cpu_times) for r in runners}
    fastest = {r.name: min(r.times) for r in runners}
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    common = {"date": date, "device": cpu_name(), "git_rev": git_rev(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "model": model_name, "batch": args.batch, "seq": args.seq,
              "repeats": args.repeats, "load_avg": f"{load_before:.1f}-{load_average():.1f}"}
    rows = []
    for runner in runners:
        name = runner.name
        flops = (6 if name == "full" else 4) * n_params * tokens
        rows.append({
            **common, "provider": name, "builder": runner.builder,
            "median_ms": f"{1e3 * median[name]:.1f}",
            "ratio_to_lora": f"{median[name] / median['lora']:.3f}",
            "ratio_to_full": f"{median[name] / median['full']:.3f}",
            "cpu_ms": f"{1e3 * cpu[name]:.1f}",
            "cpu_ratio_to_lora": f"{cpu[name] / cpu['lora']:.3f}",
            "cpu_ratio_to_full": f"{cpu[name] / cpu['full']:.3f}",
            "min_ms": f"{1e3 * fastest[name]:.1f}",
            "min_ratio_to_lora": f"{fastest[name] / fastest['lora']:.3f}",
            "min_ratio_to_full": f"{fastest[name] / fastest['full']:.3f}",
            "saved_mb": f"{saved[name] / 2**20:.1f}",
            "saved_ratio_to_lora": f"{saved[name] / saved['lora']:.3f}",
            "saved_ratio_to_full": f"{saved[name] / saved['full']:.3f}",
            "trainable_params": sum(p.numel() for p in runner.params),
            "gflops_per_s": f"{flops / median[name] / 1e9:.1f}",
            "counted_gflop": f"{counted[name] / 1e9:.1f}",
            "flop_ratio_to_lora": f"{counted[name] / counted['lora']:.3f}",
            "flop_ratio_to_full": f"{counted[name] / counted['full']:.3f}",
        })
    return rows


# ---------------------------------------------------------------- results files


def append_csv(rows: list[dict]) -> None:
    """Append ``rows``; a CSV written with fewer columns is rewritten with the current ones (blank there)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    old = read_csv() if CSV_PATH.exists() else []
    with CSV_PATH.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, restval="")
        writer.writeheader()
        writer.writerows(old + rows)


def read_csv() -> list[dict]:
    with CSV_PATH.open(newline="") as f:
        return [{k: v for k, v in row.items() if k in FIELDS} for row in csv.DictReader(f)]


def write_markdown(rows: list[dict]) -> None:
    cols = ["date", "git_rev", "device", "threads", "load_avg", "model", "provider", "builder", "median_ms",
            "ratio_to_lora", "ratio_to_full", "cpu_ms", "cpu_ratio_to_lora", "cpu_ratio_to_full", "min_ms",
            "min_ratio_to_lora", "min_ratio_to_full", "saved_mb", "saved_ratio_to_lora", "saved_ratio_to_full",
            "trainable_params", "gflops_per_s", "counted_gflop", "flop_ratio_to_lora", "flop_ratio_to_full"]
    lines = [
        "# S²FT vs LoRA vs full fine-tuning (generated by benchmarks/bench_s2ft.py from s2ft_vs_lora.csv)",
        "",
        "One training step (forward + backward + AdamW step), batch x seq tokens, median over interleaved "
        "repeats. Ratios are to LoRA / full fine-tuning in the same run. `saved_mb`: activations saved for "
        "backward (unique storages, parameters excluded). Targets: step S²FT <= 0.95x LoRA and <= 0.5x "
        "full; saved activations <= 0.75x LoRA and <= 0.70x full. `gflops_per_s` counts 6NT (full) or "
        "4NT (S²FT, LoRA). `cpu_ms`: process CPU time per step (median), less stretched than wall time "
        "when other processes share the cores; `min_ms`: fastest step (the least disturbed by other load); "
        "`load_avg`: 1-minute load average before-after the timed "
        "rounds. `counted_gflop`: forward + backward FLOPs of one step counted by `FlopCounterMode` (matmuls "
        "and attention; independent of machine load).",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in cols) + " |" for row in rows]
    MD_PATH.write_text("\n".join(lines) + "\n")


def write_plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last_date = rows[-1]["date"]
    latest = [r for r in rows if r["date"] == last_date and r["git_rev"] == rows[-1]["git_rev"]]
    names = [r["provider"] for r in latest]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].bar(names, [float(r["median_ms"]) for r in latest], color="tab:blue")
    axes[0].set_ylabel("median step time (ms)")
    axes[1].bar(names, [float(r["saved_mb"]) for r in latest], color="tab:orange")
    axes[1].set_ylabel("activations saved for backward (MB)")
    fig.suptitle(f"{latest[0]['model']}, {latest[0]['batch']}x{latest[0]['seq']} tokens, "
                 f"{latest[0]['threads']} threads, {last_date} ({latest[0]['git_rev']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(PNG_PATH, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--builder", choices=["auto", "transform", "local"], default="auto")
    parser.add_argument("--tiny", action="store_true", help="tiny random LLaMA smoke run; writes nothing")
    parser.add_argument("--dry-run", action="store_true", help="print the table, write no results files")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="record results from a checkout with uncommitted changes (tagged -dirty)")
    args = parser.parse_args()
    if not (args.tiny or args.dry_run):
        require_clean_tree(args.allow_dirty)
    rows = run(args)
    cols = ["provider", "builder", "median_ms", "ratio_to_lora", "ratio_to_full", "cpu_ms",
            "cpu_ratio_to_lora", "cpu_ratio_to_full", "min_ms", "min_ratio_to_lora", "min_ratio_to_full",
            "saved_mb", "saved_ratio_to_lora", "saved_ratio_to_full", "trainable_params", "gflops_per_s",
            "counted_gflop", "flop_ratio_to_lora", "flop_ratio_to_full"]
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(str(row[c]) for c in cols))
    if args.tiny or args.dry_run:
        return
    append_csv(rows)
    all_rows = read_csv()
    write_markdown(all_rows)
    write_plot(all_rows)
    print(f"wrote {CSV_PATH.name}, {MD_PATH.name}, {PNG_PATH.name} in {RESULTS}")


if __name__ == "__main__":
    main()
