"""The ``fxsparse`` command line: inspect, finetune, demo, pretrain, export, merge, export-lora, bench, tune.

    fxsparse inspect --model smollm2          # readable table of blocks, heads, channels
    fxsparse inspect --model tiny-qwen3 --json
    fxsparse finetune --model smollm2 --task add --steps 200 --out runs/add
    fxsparse merge --model smollm2 --adapter runs/add/adapter --out merged/
    fxsparse pretrain --preset 9m --steps 30 --out runs/9m     # corpus: this Python's standard library
    fxsparse export runs/9m --out runs/9m-hf                    # a Hugging Face model folder

Every subcommand's ``--help`` lists each option with its default.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "format_structure", "HelpFormatter"]

# Subcommands whose options and behaviour live in their own module: module.add_parser(subparsers)
# registers the subcommand, module.run(args) runs it. A module that is missing (or has no add_parser)
# only takes its subcommands away; the rest of the command line works.
_DELEGATED = {"finetune": "fxsparse.app.finetune", "demo": "fxsparse.app.finetune", "pretrain": "fxsparse.app.pretrain",
              "export-lora": "fxsparse.export"}

# Where `fxsparse export` looks for export_hf(checkpoint_path, out_dir), which turns a pretrain checkpoint into
# a Hugging Face model folder (the training loop's modules provide it).
_EXPORT_HF_MODULES = ("fxsparse.app.pretrain", "fxsparse.app.checkpoint", "fxsparse.app.loop", "fxsparse.app.export_hf")

# bench: which script, and the files it appends to / regenerates under benchmarks/results (or --out)
_BENCH_SCRIPTS = {"s2ft": ("bench_s2ft.py", "s2ft_vs_lora.csv (+ .md, .png)"),
                  "sltrain": ("bench_sltrain_block.py", "sltrain_block.csv (+ .md)")}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with every option's default: ``(default: X)`` after its help, ``(default: not set)`` for an
    option left unset; a help text that states its default in its own words (``(default ...``) is kept as
    written, and flags (``store_true``) show none.
    """

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        return not (action.default is argparse.SUPPRESS or action.nargs == 0 or not action.option_strings
                    or action.required or action.help is argparse.SUPPRESS)

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._shows_default(action):
            # argparse prints no help line at all for an option without help text: give it one, the default
            action = copy.copy(action)
            action.help = self._get_help_string(action)
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not self._shows_default(action) or "(default" in text:
            return text
        if action.default is None:
            return f"{text} (default: not set)".strip()
        value = action.default
        shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        return f"{text} (default: {shown.replace('%', '%%')})".strip()


class _SubcommandParser(argparse.ArgumentParser):
    """The parser class of every subcommand: :class:`HelpFormatter` unless a module asks for a custom one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("formatter_class") in (None, argparse.HelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
            kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)


def format_structure(structure) -> str:
    """A fixed-width table of what discovery found, one row per block."""
    rows = [("block", "q/k/v (fused?)", "o", "heads", "kv", "head_dim", "ffn up/gate -> down", "channels", "act")]
    for block in structure.blocks:
        a, f = block.attention, block.ffn
        attn = ("-",) * 5
        if a is not None:
            qkv = a.q.path if a.q.fused else f"{a.q.path.rsplit('.', 1)[-1]},{a.k.path.rsplit('.', 1)[-1]}," \
                                               f"{a.v.path.rsplit('.', 1)[-1]}"
            attn = (qkv + (" (fused)" if a.q.fused else ""), a.o.path.rsplit(".", 1)[-1], str(a.num_heads),
                    str(a.num_kv_heads), str(a.head_dim))
        ffn = ("-", "-", "-")
        if f is not None:
            gate = f"/{f.gate.path.rsplit('.', 1)[-1]}" if f.gate is not None else ""
            name = f"{f.up.path.rsplit('.', 1)[-1]}{gate} -> {f.down.path.rsplit('.', 1)[-1]}"
            ffn = (name + (" (fused)" if f.up.fused else ""), str(f.channels), f.activation)
        index = str(block.index) if block.part_of is None else f"{block.part_of}.e{block.index}"  # an expert
        rows.append((index, *attn[:2], *attn[2:], *ffn))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if structure.blocks and structure.blocks[0].attention is not None:
        lines.insert(0, f"first block's attention: {structure.blocks[0].attention.q.path.rsplit('.', 1)[0]}")
    experts = sum(1 for block in structure.blocks if block.part_of is not None)
    if experts:
        lines.append(f"{experts} expert FFN(s) listed as N.eK: expert K of block N, selected on its own")
    fixed = [b for b in structure.blocks if b.attention is not None and b.attention.fixed_order]
    if fixed:
        lines.append(f"attention heads kept in place in {len(fixed)} block(s) (S²FT trains them there, gathered):")
        lines += [f"  block {b.index}: {b.attention.fixed_order}" for b in fixed]
    fixed = [b for b in structure.blocks if b.ffn is not None and b.ffn.fixed_order]
    if fixed:
        lines.append(f"FFN channels kept in place in {len(fixed)} block(s) (S²FT trains them there, gathered):")
        lines += [f"  block {b.index}: {b.ffn.fixed_order}" for b in fixed]
    lines.append(f"unrecognized linears (left dense): {len(structure.unrecognized) or 'none'}")
    reasons = getattr(structure, "reasons", {}) or {}
    for path in structure.unrecognized:
        lines.append(f"  {path}: {reasons.get(path, 'not part of an attention or FFN pattern')}")
    return "\n".join(lines)


def _inspect(args) -> dict:
    import fxsparse
    from fxsparse.app.models import load_model

    model, _ = load_model(args.model)
    structure = fxsparse.inspect(model)
    result = structure.to_dict()
    print(json.dumps(result, indent=2) if args.json else format_structure(structure))
    return result


def _merge(args) -> dict:
    import fxsparse
    from fxsparse.app.models import load_model

    model, tokenizer = load_model(args.model)
    fxsparse.load_adapter(model, args.adapter)
    fxsparse.merge(model)
    out = Path(args.out)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    print(f"merged model written to {out}")
    return {"out": str(out)}


def _bench(args) -> dict:
    import runpy

    folder = Path(__file__).resolve().parent.parent.parent / "benchmarks"
    if args.quick:
        if args.which is not None or args.rest:
            raise ValueError("--quick runs every benchmark at toy size: give no benchmark name or options")
        if not (folder / "quick.py").exists():
            raise ValueError("benchmarks/quick.py not found: run `fxsparse bench --quick` from a source checkout")
        sys.path.insert(0, str(folder))
        import quick

        status = quick.main([])
        if status:
            raise ValueError("a benchmark failed at toy size (its output is above)")
        return {"script": str(folder / "quick.py"), "argv": []}
    if args.which is None:
        raise ValueError(f"name a benchmark ({', '.join(_BENCH_SCRIPTS)}) or give --quick")
    script_name, outputs = _BENCH_SCRIPTS[args.which]
    script = folder / script_name
    if not script.exists():
        raise ValueError(f"benchmark script {script.name} not found: run `fxsparse bench` from a source checkout")
    rest = list(args.rest)
    if args.out is not None:
        rest = ["--out", str(args.out), *rest]
    target = args.out if args.out is not None else "benchmarks/results/"
    if {"-h", "--help"} & set(rest):
        pass  # the script's own help follows
    elif "--tiny" in rest or "--dry-run" in rest:
        print(f"bench {args.which}: {script_name} {' '.join(rest)} (a trial run: writes no results file)")
    else:
        print(f"bench {args.which}: {script_name} {' '.join(rest)}; appends its rows to {target} {outputs}")
    sys.argv = [str(script), *rest]
    sys.path.insert(0, str(folder))  # the scripts share benchmarks/_env.py
    runpy.run_path(str(script), run_name="__main__")
    return {"script": str(script), "argv": rest}


def _tune(args) -> dict:
    from fxsparse.tune import run

    return run(args)


def _find_export_hf():
    for module_name in _EXPORT_HF_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        if callable(getattr(module, "export_hf", None)):
            return module.export_hf
    return None


def _export(args) -> dict:
    """``fxsparse export CHECKPOINT --out DIR``: a pretrain checkpoint as a Hugging Face model folder."""
    source = Path(args.checkpoint)
    if source.is_dir():
        source = source / "checkpoint.pt"
    if not source.is_file():
        raise ValueError(f"checkpoint {str(source)!r} does not exist: give the checkpoint.pt that `fxsparse "
                         "pretrain` wrote, or its --out folder")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise ValueError(f"--out {str(out)!r} already exists and is not empty: pass --overwrite to write over it, "
                         "or choose another folder")
    export_hf = _find_export_hf()
    if export_hf is None:
        raise ValueError("this installation has no export_hf(checkpoint_path, out_dir) (looked in "
                         f"{', '.join(_EXPORT_HF_MODULES)}): `fxsparse export` cannot run here")
    export_hf(source, out)
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    print(f"Hugging Face model folder written to {out} ({', '.join(written)})")
    print(f"load it with: AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return {"checkpoint": str(source), "out": str(out), "files": written}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxsparse", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_SubcommandParser)

    p = sub.add_parser("inspect", help="find heads, GQA groups and FFN channels of a model")
    p.add_argument("--model", default="smollm2", help="smollm2, a tiny preset (tiny-llama...) or a folder")
    p.add_argument("--json", action="store_true", help="print Structure.to_dict() as JSON")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("merge", help="apply an S2FT adapter to a base model and save a plain model")
    p.add_argument("--model", default="smollm2", help="the base model the adapter was trained on")
    p.add_argument("--adapter", required=True, help="folder written by save_adapter / finetune")
    p.add_argument("--out", required=True, help="folder for the merged transformers model")
    p.set_defaults(func=_merge)

    p = sub.add_parser("export", help="turn a `fxsparse pretrain` checkpoint into a Hugging Face model folder",
                       description="Write the model of a `fxsparse pretrain` checkpoint as a Hugging Face model "
                                   "folder (SLTrain / low-rank layers merged to dense weights) that "
                                   "AutoModelForCausalLM.from_pretrained loads.")
    p.add_argument("checkpoint", help="checkpoint.pt written by fxsparse pretrain, or the run's --out folder")
    p.add_argument("--out", required=True, help="folder to write the Hugging Face model to")
    p.add_argument("--overwrite", action="store_true", help="write into --out even if it is not empty")
    p.set_defaults(func=_export)

    p = sub.add_parser("bench", help="run a side-by-side benchmark (source checkout); appends its results to "
                                     "benchmarks/results/ unless --out is given",
                       description="Run benchmarks/bench_s2ft.py (s2ft: S2FT vs LoRA vs full fine-tuning) or "
                                   "benchmarks/bench_sltrain_block.py (sltrain: SLTrain block vs random support "
                                   "vs dense). Each appends rows to its CSV under benchmarks/results/ (the "
                                   "committed record; it refuses a checkout with uncommitted changes unless "
                                   "--allow-dirty) and regenerates the tables; --out DIR writes them to DIR "
                                   "instead, --tiny is a quick trial that writes nothing. Options after the "
                                   "benchmark name go to its script (see `fxsparse bench s2ft --help`). "
                                   "--quick runs every benchmark of benchmarks/ at toy size, writing nothing "
                                   "(about two minutes).")
    p.add_argument("--quick", action="store_true", help="every benchmark at toy size, as a smoke run")
    p.add_argument("--out", default=None,
                   help="folder for the results files (default: benchmarks/results/, the committed record)")
    p.add_argument("which", nargs="?", default=None, choices=list(_BENCH_SCRIPTS), help="which benchmark")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options for the benchmark script")
    p.set_defaults(func=_bench)

    p = sub.add_parser("tune", help="pre-autotune the Triton kernels of a model's shapes (CUDA only: elsewhere it "
                                    "says so and exits), or --clear the kernel cache")
    from fxsparse.tune import add_arguments as _tune_arguments

    _tune_arguments(p)
    p.set_defaults(func=_tune)

    for module_name in dict.fromkeys(_DELEGATED.values()):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        if callable(getattr(module, "add_parser", None)):
            module.add_parser(sub)
    for command, module_name in _DELEGATED.items():
        if command in sub.choices and sub.choices[command].get_default("func") is None:
            sub.choices[command].set_defaults(func=importlib.import_module(module_name).run)
    return parser


# What `pip install fxsparse[app]` adds to the library's dependencies (pyproject.toml).
_APP_EXTRAS = {"tqdm", "gguf", "matplotlib", "numpy"}


def parser_commands(parser: argparse.ArgumentParser) -> list[str]:
    """The subcommands ``parser`` (from :func:`build_parser`) offers."""
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return list(actions[0].choices) if actions else []


def demo_epilogue(args: argparse.Namespace, since: float, with_export_lora: bool = True) -> str:
    """What ``fxsparse demo`` wrote (every file under ``--out`` written since ``since``) and what to do next."""
    out = Path(args.out)
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.stat().st_mtime >= since - 2)
    lines = [f"the demo wrote {len(files)} files under {out}:"]
    for path in files:
        size = path.stat().st_size
        shown = f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"
        lines.append(f"  {path.relative_to(out)}  ({shown})")
    model, adapter = args.model, out / "adapter"
    lines += [
        "next:",
        f"  fxsparse merge --model {model} --adapter {adapter} --out {out / 'merged'}"
        "    # a plain transformers model",
        *([f"  fxsparse export-lora --model {model} --adapter {adapter} --out {out / 'lora'}"
           "    # the adapter as a PEFT LoRA"] if with_export_lora else []),
        f"  fxsparse finetune --model {model} --task reverse --out runs/reverse"
        "    # another task (fxsparse finetune --list-tasks)",
        f"  fxsparse finetune --model {model} --data pairs.jsonl --out runs/mine"
        '    # your data: {"prompt": ..., "response": ...} per line',
        f"  python: fxsparse.load_adapter(model, {str(adapter)!r}) on the base model, then fxsparse.merge(model)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.time()
    try:
        args.func(args)
        if args.command == "demo" and not getattr(args, "list_tasks", False):
            print(demo_epilogue(args, started, with_export_lora="export-lora" in parser_commands(parser)))
    except ValueError as exc:
        print(f"fxsparse {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name not in _APP_EXTRAS:
            raise
        print(f"fxsparse {args.command}: error: the command needs {exc.name!r}, one of the application's extras: "
              "pip install 'fxsparse[app]'", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
