"""torch.compile backends side by side: step time and saved activations on SmolLM2-135M, batch 2 x 128, CPU.

One process, one base model (SmolLM2-135M-Instruct, float32), random tokens with ``labels = input_ids``,
AdamW over the trainable parameters. Providers (all in one run, repeats interleaved, medians reported):

- ``floor``: the same model with no weight gradient at all: every parameter frozen, only the embedding
  output requires grad, so backward still runs through every block (the cost any method that trains
  weights inside the blocks must pay), eager; ``floor_fxsparse``: the floor compiled with the fxsparse backend
  (what compilation alone takes off the floor: S²FT compiled against it shows the cost of S²FT itself);
- ``s2ft``: ``fxsparse.transform(model, "s2ft")`` with the default ratios (``o`` 0.052, ``down`` 0.02), eager;
- ``s2ft_inductor``: the same model under ``torch.compile`` with inductor (what the passes add is the
  difference to the next row);
- ``s2ft_fxsparse``: the same model under ``torch.compile(backend="fxsparse")``;
- ``lora``: PEFT LoRA r=16, alpha 32, on q, k, v, o, gate, up, down, eager; ``lora_inductor``: compiled
  with inductor;
- ``full``: full fine-tuning, eager.

A step is forward + LM-loss backward + ``optimizer.step()`` + ``zero_grad``. ``saved_mb``: activation
memory autograd keeps for backward in one step (unique storages packed by ``saved_tensors_hooks``,
parameters and buffers excluded; a compiled model packs what AOT autograd's partitioner saves).
``compile_s``: first (compiling) step. ``gemm_ms``: time inside matrix products (one profiled step); over
the floor's step time it is the arithmetic limit of a provider's ratio (see :meth:`Runner.gemm_ms`).
Targets (issue 9): ``s2ft_fxsparse`` <= 0.9x ``floor`` and <= 0.75x ``lora_inductor``; its saved
activations <= 0.45x ``full``'s.

Appends one row per provider to ``<out>/compile.csv`` (default ``benchmarks/results``, the committed
record; refuses a dirty checkout unless ``--allow-dirty``) and regenerates ``<out>/compile.md``::

    python benchmarks/bench_compile.py                         # SmolLM2-135M, several minutes on 2 cores
    python benchmarks/bench_compile.py --tiny                  # smoke run on a tiny random LLaMA, writes nothing
    python benchmarks/bench_compile.py --allow-dirty --out /tmp/compile   # a trial run outside the record
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
from _env import base_model, cpu_name, git_rev, load_average, require_clean_tree
from torch import nn

import fxsparse
from fxsparse.memory import SavedActivations

RESULTS = Path(__file__).resolve().parent / "results"
CSV_NAME, MD_NAME = "compile.csv", "compile.md"
DEFAULT_RATIOS = {"o": 0.052, "down": 0.02}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmm_", "aten::addbmm"}
PROVIDERS = ("floor", "floor_fxsparse", "s2ft", "s2ft_inductor", "s2ft_fxsparse", "lora", "lora_inductor", "full")
FIELDS = ["date", "device", "git_rev", "torch", "threads", "model", "batch", "seq", "provider", "median_ms",
          "cpu_ms", "min_ms", "ratio_to_floor", "ratio_to_lora_inductor", "cpu_ratio_to_floor",
          "cpu_ratio_to_lora_inductor", "gemm_ms", "gemm_limit_to_floor", "saved_mb", "saved_ratio_to_full",
          "compile_s", "trainable_params", "fusions", "repeats", "load_avg"]


# ---------------------------------------------------------------- providers


def _freeze_all(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_floor(base: nn.Module) -> nn.Module:
    """Every weight frozen; the model is fed embeddings that require grad (backward reaches every block).

    The embedding lookup happens outside the model (:func:`floor_inputs`), so the compiled floor sees the same
    leaf tensor as the eager one (a ``requires_grad_`` inside a compiled graph would break it).
    """
    return _freeze_all(copy.deepcopy(base))


def floor_inputs(model: nn.Module, batch: dict) -> dict:
    """``input_ids`` -> ``inputs_embeds`` that require grad, for the floor providers."""
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    return {"inputs_embeds": embeds, "labels": batch["labels"]}


def build_s2ft(base: nn.Module) -> nn.Module:
    return fxsparse.transform(copy.deepcopy(base), recipe="s2ft", ratios=dict(DEFAULT_RATIOS))


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


def build(name: str, base: nn.Module, shared: dict) -> tuple[nn.Module, nn.Module]:
    """(module to call, the underlying model). Compiled providers share the eager provider's model."""
    if name.startswith("floor"):
        model = build_floor(base)
    elif name.startswith("s2ft"):
        model = build_s2ft(base) if name == "s2ft" or "s2ft" not in shared else copy.deepcopy(shared["s2ft"])
        shared.setdefault("s2ft", model)
    elif name.startswith("lora"):
        model = build_lora(base)
    else:
        model = build_full(base)
    if name.endswith("_inductor"):
        return torch.compile(model, backend="inductor", fullgraph=True), model
    if name.endswith("_fxsparse"):
        return torch.compile(model, backend="fxsparse", fullgraph=True), model
    return model, model


# ---------------------------------------------------------------- measurement


class Runner:
    """One provider: the callable, AdamW over its trainable parameters, and a timed training step."""

    def __init__(self, name: str, fn: nn.Module, model: nn.Module):
        self.name, self.fn, self.model = name, fn, model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5) if self.params else None
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.compile_s = 0.0

    def inputs(self, batch: dict) -> dict:
        return floor_inputs(self.model, batch) if self.name.startswith("floor") else batch

    def step(self, batch: dict) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) of one training step."""
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = self.fn(**self.inputs(batch)).loss
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, time.process_time() - cpu_start

    def gemm_ms(self, batch: dict) -> float:
        """Milliseconds one training step spends inside matrix products (one profiled step).

        Every provider here runs the same matrix products on the frozen weights (forward, and the input
        gradient through every block); what compilation can remove is the rest. So ``gemm_ms`` of a
        provider over the floor's step time is the ratio it could reach if everything but its matrix
        products were free: the arithmetic limit to set beside its measured ratio.
        """
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            self.step(batch)
        total_us = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in _GEMM_OPS)
        return total_us / 1e3

    def saved_bytes(self, batch: dict) -> int:
        with SavedActivations(exclude=[*self.model.parameters(), *self.model.buffers()]) as saved:
            loss = self.fn(**self.inputs(batch)).loss
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        return saved.bytes


def _fusion_summary(model: nn.Module) -> str:
    from fxsparse.compile import compile_report

    return "; ".join(compile_report(model).summary().splitlines())


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base, model_name = base_model(args.tiny)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=generator)
    batch = {"input_ids": ids, "labels": ids}
    shared: dict = {}
    runners = []
    for name in args.providers:
        fn, model = build(name, base, shared)
        runner = Runner(name, fn, model)
        wall, _ = runner.step(batch)  # compiles the compiled providers
        runner.compile_s = wall
        print(f"{name}: {sum(p.numel() for p in runner.params):,} trainable params, first step {wall:.1f} s",
              flush=True)
        runners.append(runner)
    del base, shared
    saved = {r.name: r.saved_bytes(batch) for r in runners}
    gemm = {r.name: r.gemm_ms(batch) for r in runners}
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

    def ratio(table: dict, name: str, ref: str) -> str:
        return f"{table[name] / table[ref]:.3f}" if ref in table and table[ref] else ""

    rows = []
    for runner in runners:
        name = runner.name
        rows.append({
            **common, "provider": name,
            "median_ms": f"{1e3 * median[name]:.1f}", "cpu_ms": f"{1e3 * cpu[name]:.1f}",
            "min_ms": f"{1e3 * fastest[name]:.1f}",
            "ratio_to_floor": ratio(median, name, "floor"),
            "ratio_to_lora_inductor": ratio(median, name, "lora_inductor"),
            "cpu_ratio_to_floor": ratio(cpu, name, "floor"),
            "cpu_ratio_to_lora_inductor": ratio(cpu, name, "lora_inductor"),
            "gemm_ms": f"{gemm[name]:.1f}",
            "gemm_limit_to_floor": f"{gemm[name] / 1e3 / median['floor']:.3f}" if "floor" in median else "",
            "saved_mb": f"{saved[name] / 2**20:.1f}", "saved_ratio_to_full": ratio(saved, name, "full"),
            "compile_s": f"{runner.compile_s:.1f}" if name.endswith(("_inductor", "_fxsparse")) else "",
            "trainable_params": sum(p.numel() for p in runner.params),
            "fusions": _fusion_summary(runner.model) if name.endswith("_fxsparse") else "",
        })
    return rows


# ---------------------------------------------------------------- results files


def append_csv(rows: list[dict], csv_path: Path) -> list[dict]:
    """Append ``rows`` (rewriting the header if columns changed); returns every row in the file."""
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    old = []
    if csv_path.exists():
        with csv_path.open(newline="") as f:
            old = [{k: v for k, v in row.items() if k in FIELDS} for row in csv.DictReader(f)]
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, restval="")
        writer.writeheader()
        writer.writerows(old + rows)
    return old + rows


def write_markdown(rows: list[dict], md_path: Path) -> None:
    cols = ["date", "git_rev", "device", "threads", "load_avg", "model", "provider", "median_ms", "cpu_ms",
            "min_ms", "ratio_to_floor", "ratio_to_lora_inductor", "cpu_ratio_to_floor", "cpu_ratio_to_lora_inductor",
            "gemm_ms", "gemm_limit_to_floor", "saved_mb", "saved_ratio_to_full", "compile_s", "trainable_params",
            "fusions"]
    lines = [
        f"# torch.compile backends (generated by benchmarks/bench_compile.py from {CSV_NAME})",
        "",
        "One training step (forward + backward + AdamW step) of SmolLM2-135M, batch x seq tokens, float32, "
        "median over interleaved repeats; ratios to the eager floor (no weight gradient, backward through "
        "every block) and to PEFT LoRA compiled with inductor, from the same run. `cpu_ms`: process CPU time "
        "(less stretched by other load on shared cores); `min_ms`: fastest step. `gemm_ms`: time inside matrix "
        "products in one profiled step; `gemm_limit_to_floor` = gemm_ms / floor's median: the ratio a provider "
        "would reach if everything but its matrix products cost nothing (the arithmetic limit beside the "
        "measured ratio). `saved_mb`: activations saved for backward. Targets: `s2ft_fxsparse` <= 0.9x floor "
        "and <= 0.75x `lora_inductor`; saved <= 0.45x full.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in cols) + " |" for row in rows]
    md_path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--tiny", action="store_true", help="tiny random LLaMA smoke run; writes nothing")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="folder for compile.csv / compile.md (default: benchmarks/results, the committed record)")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="record results from a checkout with uncommitted changes (tagged -dirty)")
    args = parser.parse_args()
    if not args.tiny:
        require_clean_tree(args.allow_dirty)
    rows = run(args)
    cols = ["provider", "median_ms", "cpu_ms", "min_ms", "ratio_to_floor", "ratio_to_lora_inductor",
            "cpu_ratio_to_floor", "cpu_ratio_to_lora_inductor", "gemm_ms", "gemm_limit_to_floor", "saved_mb",
            "saved_ratio_to_full", "compile_s", "trainable_params", "fusions"]
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(str(row[c]) for c in cols))
    if args.tiny:
        return
    all_rows = append_csv(rows, args.out / CSV_NAME)
    write_markdown(all_rows, args.out / MD_NAME)
    print(f"wrote {CSV_NAME} and {MD_NAME} in {args.out}")


if __name__ == "__main__":
    main()
