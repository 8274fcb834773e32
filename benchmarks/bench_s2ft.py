"""S²FT vs PEFT LoRA vs full fine-tuning: step time and saved activations on SmolLM2-135M, side by side.

One process, one base model (SmolLM2-135M-Instruct, float32), batch 2 x 128 tokens, AdamW. Providers:

- ``s2ft``: ``fxsparse.transform(model, recipe="s2ft")`` with the default ratios (``o`` 0.052, ``down``
  0.02; columns of O and Down, units drawn from one pool across all blocks) and gated FFNs that
  recompute ``act(gate)`` in backward. With ``--builder local`` (or when the recipe is not available) the
  same model is built here from the passes: ``select_units`` -> ``permute_coupled`` -> ``replace_s2ft``
  -> ``recompute_gated_act``;
- ``lora``: PEFT LoRA, r=16, alpha=32, no dropout, on q, k, v, o, gate, up, down;
- ``full``: every parameter trains;
- ``dora``: PEFT DoRA (``LoraConfig(use_dora=True)``), r=16, same targets;
- ``shira``: PEFT SHiRA (``ShiraConfig``), r=16 (r (m + n) random entries per weight: LoRA r=16's count), same
  targets;
- ``supertuning``: PEFT Super-Tuning (``SupertuningConfig``), the largest-magnitude entries of each target weight,
  ``sparsity`` chosen so the trainable count matches S²FT's default (about 0.990 on SmolLM2-135M);
- ``supra``: Super-Tuning with its low-rank part: ``r`` = the LoRA rank worth half of S²FT's count and the sparse
  support the other half.

``--providers`` picks a subset (default: all of them; ratios to LoRA / full stay blank without those).

A step is forward + LM-loss backward + ``optimizer.step()`` + ``zero_grad``. Repeats are interleaved
(one step of each provider per round, after warm-up steps) and medians reported, with the ratios
S²FT/LoRA and S²FT/full from the same run, for wall time and for process CPU time (the machine may be
shared; the 1-minute load average is recorded with each row), and the fastest step of each. ``saved MB``
is the activation memory autograd keeps for backward in one step: unique storages packed by
``saved_tensors_hooks``, parameters and buffers excluded. ``counted GFLOP`` is the forward + backward
arithmetic of one step as ``FlopCounterMode`` counts it (matmuls and attention, from shapes: unaffected
by other load on the machine). ``peak MB`` is the peak of live tensor memory during one step (forward,
backward, optimizer step, zero_grad), as :class:`LiveTensorPeak` counts it: every tensor storage alive at
that moment, i.e. the weights, buffers, gradients, optimizer state, activations and temporaries that
operators return, without an operator's internal scratch or the allocator's caching and fragmentation (on
CPU there is no allocator statistic to read); ``peak extra MB`` is the same peak less the parameters and
buffers (what the step adds on top of the model); ``opt state MB`` the bytes of AdamW's state tensors
after a step. ``GFLOP/s`` counts 6 N T for full fine-tuning and 4 N T for the others (N parameters, T
tokens): the arithmetic limit the ratio to full cannot beat by much.

Appends one row per provider to ``benchmarks/results/s2ft_vs_lora.csv`` and regenerates
``s2ft_vs_lora.md`` and ``s2ft_vs_lora.png`` from the whole CSV::

    python benchmarks/bench_s2ft.py                  # SmolLM2-135M, a few minutes on 2 cores
    python benchmarks/bench_s2ft.py --providers s2ft,lora,full      # the original three
    python benchmarks/bench_s2ft.py --tiny           # smoke run on a tiny random LLaMA, writes nothing
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import statistics
import time
import weakref
from pathlib import Path

import torch
from _env import base_model, cpu_name, git_rev, load_average, require_clean_tree
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.weak import WeakIdKeyDictionary

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
          "flop_ratio_to_full", "repeats", "load_avg", "peak_mb", "peak_ratio_to_lora", "peak_ratio_to_full",
          "peak_extra_mb", "opt_state_mb"]
PROVIDERS = ["s2ft", "lora", "full", "dora", "shira", "supertuning", "supra"]


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


def build_lora(base: nn.Module, rank: int = 16) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                        task_type="CAUSAL_LM")
    return get_peft_model(copy.deepcopy(base), config)


def build_full(base: nn.Module) -> nn.Module:
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def target_linears(model: nn.Module, targets=LORA_TARGETS) -> list[nn.Linear]:
    """The linear layers PEFT targets (names ending in one of ``targets``), in module order."""
    return [m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets]


def lora_params_per_rank(model: nn.Module, targets=LORA_TARGETS) -> int:
    """Trainable parameters one unit of LoRA rank costs on ``targets``: sum of in + out features."""
    return sum(m.in_features + m.out_features for m in target_linears(model, targets))


def matched_rank(model: nn.Module, budget: int, targets=LORA_TARGETS) -> int:
    """The LoRA rank whose trainable count on ``targets`` is nearest to ``budget`` (at least 1)."""
    return max(1, round(budget / lora_params_per_rank(model, targets)))


def supertuning_sparsity(model: nn.Module, budget: int, targets=LORA_TARGETS) -> float:
    """The ``SupertuningConfig.sparsity`` whose trainable count on ``targets`` is ``budget`` (to within one
    entry per layer: PEFT keeps ``int(numel * (1 - sparsity))`` entries of each weight)."""
    total = sum(m.weight.numel() for m in target_linears(model, targets))
    if not 0 < budget < total:
        raise ValueError(f"a sparse budget of {budget} entries does not fit the {total} target weights")
    linears = target_linears(model, targets)
    # nudged up by half an entry per layer so int() rounding does not lose one entry in each layer; capped so
    # the smallest weight keeps one entry (PEFT refuses a layer with none: only matters on tiny models)
    sparsity = 1.0 - (budget + 0.5 * len(linears)) / total
    return min(sparsity, 1.0 - 1.0 / min(m.weight.numel() for m in linears))


def build_peft(base: nn.Module, kind: str, rank: int = 16, budget: int | None = None, seed: int = 0,
               targets=LORA_TARGETS) -> nn.Module:
    """A PEFT model of ``kind`` on ``targets`` of a copy of ``base`` (``get_peft_model``).

    ``lora``/``dora``/``shira`` use ``rank`` (SHiRA's r gives LoRA's count of random entries); ``supertuning``
    trains ``budget`` largest-magnitude entries; ``supra`` splits ``budget`` between a low-rank part (the largest
    rank within half of it, at least 1) and the sparse support (the rest).
    """
    from peft import get_peft_model

    model = copy.deepcopy(base)
    targets = list(targets)
    if kind in ("lora", "dora"):
        from peft import LoraConfig

        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets,
                            use_dora=kind == "dora", task_type="CAUSAL_LM")
    elif kind == "shira":
        from peft import ShiraConfig

        config = ShiraConfig(r=rank, target_modules=targets, random_seed=seed, task_type="CAUSAL_LM")
    elif kind in ("supertuning", "supra"):
        from peft import SupertuningConfig

        if budget is None:
            raise ValueError(f"{kind} needs a trainable budget")
        low_rank = 0
        if kind == "supra":
            per_rank = lora_params_per_rank(model, targets)
            low_rank = max(1, budget // 2 // per_rank)
            # at least one sparse entry per layer (a tiny model's budget may not even cover rank 1)
            budget = max(budget - low_rank * per_rank, len(target_linears(model, targets)))
        config = SupertuningConfig(sparsity=supertuning_sparsity(model, budget, targets), target_modules=targets,
                                   r=low_rank or None, task_type="CAUSAL_LM")
    else:
        raise ValueError(f"unknown PEFT provider {kind!r}")
    return get_peft_model(model, config)


def build_provider(name: str, base: nn.Module, builder: str, s2ft_budget: int,
                   rank: int = 16) -> tuple[nn.Module, str]:
    """Model of provider ``name`` (see the module docstring) and how it was built."""
    if name == "s2ft":
        return build_s2ft(base, builder)
    if name == "full":
        return build_full(base), ""
    if name == "lora":
        return build_lora(base, rank), ""
    return build_peft(base, name, rank=rank, budget=s2ft_budget), ""


def s2ft_default_budget(base: nn.Module, builder: str = "auto") -> int:
    """Trainable parameters of S²FT at the default ratios on ``base`` (builds it once)."""
    model, _ = build_s2ft(base, builder)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- measurement


class LiveTensorPeak(TorchDispatchMode):
    """Peak bytes of live tensor storages while active: the ``tensors`` given (alive at entry: weights,
    optimizer state, inputs) plus every storage an operator's output brings, until it is freed.

    A storage counts from the op that returns it until its last reference goes (a weak reference tells);
    views and in-place results add nothing. Not counted: scratch memory an operator frees before returning,
    and allocator caching or fragmentation (CPU has no allocator statistic; on CUDA
    ``torch.cuda.max_memory_allocated`` would also see the scratch).

    >>> with LiveTensorPeak() as tracker:
    ...     a = torch.ones(256)          # 1 KiB
    ...     b = (a * 2).sum()            # a * 2 lives until the sum is taken: 2 KiB (+4 bytes) at the peak
    ...     del a
    >>> tracker.peak
    2052
    """

    def __init__(self, tensors=()):
        super().__init__()
        self._live = WeakIdKeyDictionary()
        self.current = self.peak = 0
        for tensor in tensors:
            self._add(tensor)

    @staticmethod
    def storage_bytes(tensors) -> int:
        """Bytes of the distinct storages of ``tensors``."""
        seen = {}
        for tensor in tensors:
            for part in LiveTensorPeak._parts(tensor):
                storage = part.untyped_storage()
                seen[storage.data_ptr(), storage.nbytes()] = storage.nbytes()
        return sum(seen.values())

    @staticmethod
    def _parts(tensor):
        if tensor.layout == torch.sparse_coo:
            return [tensor._indices(), tensor._values()]
        return [tensor] if tensor.layout == torch.strided else []

    def _add(self, tensor) -> None:
        for part in self._parts(tensor):
            storage = part.untyped_storage()
            if storage in self._live:
                continue
            size = storage.nbytes()
            self._live[storage] = size
            weakref.finalize(storage, self._release, size)
            self.current += size
            self.peak = max(self.peak, self.current)

    def _release(self, size: int) -> None:
        self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._add(tensor)
        return out


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

    def peak_memory(self, batch: dict) -> tuple[int, int]:
        """(peak bytes of live tensors during one step, that peak less parameters and buffers) by
        :class:`LiveTensorPeak`. Run after a step, so AdamW's state exists and is counted."""
        weights = [*self.model.parameters(), *self.model.buffers()]
        state = [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        with LiveTensorPeak([*weights, *state, *batch.values()]) as tracker:
            self.step(batch)
        return tracker.peak, tracker.peak - LiveTensorPeak.storage_bytes(weights)

    def optimizer_state_bytes(self) -> int:
        """Bytes of the optimizer's state tensors (AdamW: two moments per trainable parameter, and steps)."""
        return sum(v.numel() * v.element_size() for state in self.optimizer.state.values()
                   for v in state.values() if torch.is_tensor(v))


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base, model_name = base_model(args.tiny)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=generator)
    batch = {"input_ids": ids, "labels": ids}
    n_params = sum(p.numel() for p in base.parameters())
    tokens = args.batch * args.seq

    names = args.providers
    budget = s2ft_default_budget(base, args.builder) if {"supertuning", "supra"} & set(names) else 0
    runners = []
    for name in names:
        model, builder = build_provider(name, base, args.builder, budget, args.rank or (4 if args.tiny else 16))
        runners.append(Runner(name, model, builder))
    del base
    for runner in runners:
        print(f"{runner.name}: {sum(p.numel() for p in runner.params):,} trainable params", flush=True)
    measured = {r.name: r.saved_bytes_and_flops(batch) for r in runners}
    saved = {name: value[0] for name, value in measured.items()}
    counted = {name: value[1] for name, value in measured.items()}
    for _ in range(max(1, args.warmup)):  # at least one step: AdamW's state exists before memory is measured
        for runner in runners:
            runner.step(batch)
    peaks = {r.name: r.peak_memory(batch) for r in runners}
    opt_state = {r.name: r.optimizer_state_bytes() for r in runners}
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
    peak = {name: value[0] for name, value in peaks.items() if value is not None}
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    common = {"date": date, "device": cpu_name(), "git_rev": git_rev(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "model": model_name, "batch": args.batch, "seq": args.seq,
              "repeats": args.repeats, "load_avg": f"{load_before:.1f}-{load_average():.1f}"}

    def ratio(values: dict, name: str, ref: str) -> str:
        """``values[name] / values[ref]``, blank when ``ref`` was not run (or not measured)."""
        if ref not in values or name not in values or not values[ref]:
            return ""
        return f"{values[name] / values[ref]:.3f}"

    rows = []
    for runner in runners:
        name = runner.name
        flops = (6 if name == "full" else 4) * n_params * tokens
        row = {**common, "provider": name, "builder": runner.builder,
               "median_ms": f"{1e3 * median[name]:.1f}", "cpu_ms": f"{1e3 * cpu[name]:.1f}",
               "min_ms": f"{1e3 * fastest[name]:.1f}", "saved_mb": f"{saved[name] / 2**20:.1f}",
               "trainable_params": sum(p.numel() for p in runner.params),
               "gflops_per_s": f"{flops / median[name] / 1e9:.1f}",
               "counted_gflop": f"{counted[name] / 1e9:.1f}",
               "opt_state_mb": f"{opt_state[name] / 2**20:.1f}"}
        if peaks[name] is not None:
            row["peak_mb"] = f"{peaks[name][0] / 2**20:.1f}"
            row["peak_extra_mb"] = f"{peaks[name][1] / 2**20:.1f}"
        for ref in ("lora", "full"):
            row[f"ratio_to_{ref}"] = ratio(median, name, ref)
            row[f"cpu_ratio_to_{ref}"] = ratio(cpu, name, ref)
            row[f"min_ratio_to_{ref}"] = ratio(fastest, name, ref)
            row[f"saved_ratio_to_{ref}"] = ratio(saved, name, ref)
            row[f"flop_ratio_to_{ref}"] = ratio(counted, name, ref)
            row[f"peak_ratio_to_{ref}"] = ratio(peak, name, ref)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- results files


def append_csv(rows: list[dict]) -> None:
    """Append ``rows``. A CSV written when there were fewer columns gets the new ones added to its header line
    only: its earlier rows stay byte for byte (a reader sees them blank there)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    if CSV_PATH.exists():
        data = CSV_PATH.read_bytes()  # bytes: the rows' line endings stay as they are
        first, sep, rest = data.partition(b"\n")
        header = next(csv.reader([first.decode().rstrip("\r")]), [])
        if header != FIELDS:
            if header != FIELDS[:len(header)]:
                raise SystemExit(f"{CSV_PATH} has columns {header}, not a prefix of {FIELDS}: not appending")
            CSV_PATH.write_bytes(",".join(FIELDS).encode() + (b"\r" if first.endswith(b"\r") else b"") + sep + rest)
    new = not CSV_PATH.exists()
    with CSV_PATH.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, restval="")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def read_csv() -> list[dict]:
    with CSV_PATH.open(newline="") as f:
        return [{k: v or "" for k, v in row.items() if k in FIELDS} for row in csv.DictReader(f)]


def write_markdown(rows: list[dict]) -> None:
    cols = ["date", "git_rev", "device", "threads", "load_avg", "model", "provider", "builder", "median_ms",
            "ratio_to_lora", "ratio_to_full", "cpu_ms", "cpu_ratio_to_lora", "cpu_ratio_to_full", "min_ms",
            "min_ratio_to_lora", "min_ratio_to_full", "saved_mb", "saved_ratio_to_lora", "saved_ratio_to_full",
            "trainable_params", "gflops_per_s", "counted_gflop", "flop_ratio_to_lora", "flop_ratio_to_full",
            "peak_mb", "peak_ratio_to_lora", "peak_ratio_to_full", "peak_extra_mb", "opt_state_mb"]
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
        "and attention; independent of machine load). `peak_mb`: peak of live tensor memory during one step "
        "(weights, gradients, optimizer state, activations, temporaries; counted per storage by a dispatch mode, "
        "no allocator caching); "
        "`peak_extra_mb`: that peak less parameters and buffers; `opt_state_mb`: AdamW state. Providers: s2ft "
        "(default ratios), PEFT lora / dora / shira at r=16, full; PEFT supertuning / supra at S²FT's "
        "trainable count (blank cells: columns added later, or the reference provider not run).",
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
    with_peak = all(r.get("peak_mb") for r in latest)
    fig, axes = plt.subplots(1, 3 if with_peak else 2, figsize=(13 if with_peak else 9, 3.5))
    axes[0].bar(names, [float(r["median_ms"]) for r in latest], color="tab:blue")
    axes[0].set_ylabel("median step time (ms)")
    axes[1].bar(names, [float(r["saved_mb"]) for r in latest], color="tab:orange")
    axes[1].set_ylabel("activations saved for backward (MB)")
    if with_peak:
        axes[2].bar(names, [float(r["peak_mb"]) for r in latest], color="tab:green")
        axes[2].set_ylabel("peak live tensor memory of a step (MB)")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=30 if len(names) > 4 else 0, labelsize=8)
    fig.suptitle(f"{latest[0]['model']}, {latest[0]['batch']}x{latest[0]['seq']} tokens, "
                 f"{latest[0]['threads']} threads, {last_date} ({latest[0]['git_rev']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(PNG_PATH, dpi=110)
    plt.close(fig)


def parse_providers(text: str) -> list[str]:
    """``"s2ft,lora,shira"`` -> that list, in the given order; an unknown name raises (argparse reports it).

    >>> parse_providers("lora, s2ft")
    ['lora', 's2ft']
    """
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"providers must be distinct names among {','.join(PROVIDERS)}; got {text!r}")
    return names


def main() -> None:
    global RESULTS, CSV_PATH, MD_PATH, PNG_PATH  # --out moves the results files
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="folder for s2ft_vs_lora.csv / .md / .png (default: benchmarks/results, the committed "
                             "record)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--builder", choices=["auto", "transform", "local"], default="auto")
    parser.add_argument("--rank", type=int, default=None,
                        help="r of lora / dora / shira (default 16; 4 with --tiny, whose layers are too small)")
    parser.add_argument("--providers", type=parse_providers, default=list(PROVIDERS),
                        help=f"comma-separated subset of {','.join(PROVIDERS)} (default: all)")
    parser.add_argument("--tiny", action="store_true", help="tiny random LLaMA smoke run; writes nothing")
    parser.add_argument("--dry-run", action="store_true", help="print the table, write no results files")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="record results from a checkout with uncommitted changes (tagged -dirty)")
    args = parser.parse_args()
    if args.out.resolve() != RESULTS:
        RESULTS = args.out.resolve()
        CSV_PATH, MD_PATH, PNG_PATH = (RESULTS / path.name for path in (CSV_PATH, MD_PATH, PNG_PATH))
    elif not (args.tiny or args.dry_run):
        require_clean_tree(args.allow_dirty)
    rows = run(args)
    cols = ["provider", "builder", "median_ms", "ratio_to_lora", "ratio_to_full", "cpu_ms",
            "cpu_ratio_to_lora", "cpu_ratio_to_full", "min_ms", "min_ratio_to_lora", "min_ratio_to_full",
            "saved_mb", "saved_ratio_to_lora", "saved_ratio_to_full", "trainable_params", "gflops_per_s",
            "counted_gflop", "flop_ratio_to_lora", "flop_ratio_to_full", "peak_mb", "peak_ratio_to_lora",
            "peak_ratio_to_full", "peak_extra_mb", "opt_state_mb"]
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(str(row.get(c, "")) for c in cols))
    if args.tiny or args.dry_run:
        return
    append_csv(rows)
    all_rows = read_csv()
    write_markdown(all_rows)
    write_plot(all_rows)
    print(f"wrote {CSV_PATH.name}, {MD_PATH.name}, {PNG_PATH.name} in {RESULTS}")


if __name__ == "__main__":
    main()
