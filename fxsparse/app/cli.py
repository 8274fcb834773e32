"""The ``fxsparse`` command line: inspect, finetune, demo, pretrain, merge, bench, tune.

    fxsparse inspect --model smollm2          # readable table of blocks, heads, channels
    fxsparse inspect --model tiny-qwen3 --json
    fxsparse finetune --model smollm2 --task add --steps 200 --out runs/add
    fxsparse merge --model smollm2 --adapter runs/add/adapter --out merged/
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

__all__ = ["main", "build_parser", "format_structure"]

# Subcommands whose options and behaviour live in their own module: module.add_parser(subparsers)
# registers the subcommand, module.run(args) runs it.
_DELEGATED = {"finetune": "fxsparse.app.finetune", "demo": "fxsparse.app.finetune", "pretrain": "fxsparse.app.pretrain"}


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
        rows.append((str(block.index), *attn[:2], *attn[2:], *ffn))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if structure.blocks and structure.blocks[0].attention is not None:
        lines.insert(0, f"first block's attention: {structure.blocks[0].attention.q.path.rsplit('.', 1)[0]}")
    lines.append(f"unrecognized linears: {', '.join(structure.unrecognized) or 'none'}")
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

    scripts = {"s2ft": "bench_s2ft.py", "sltrain": "bench_sltrain_block.py"}
    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    script = folder / scripts[args.which]
    if not script.exists():
        raise SystemExit(f"benchmark script {script.name} not found: run `fxsparse bench` from a source checkout")
    sys.argv = [str(script), *args.rest]
    sys.path.insert(0, str(folder))  # the scripts share benchmarks/_env.py
    runpy.run_path(str(script), run_name="__main__")
    return {}


def _tune(args) -> dict:
    from fxsparse.tune import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxsparse", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="find heads, GQA groups and FFN channels of a model")
    p.add_argument("--model", default="smollm2", help="smollm2, a tiny preset (tiny-llama...) or a folder")
    p.add_argument("--json", action="store_true", help="print Structure.to_dict() as JSON")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("merge", help="apply an S2FT adapter to a base model and save a plain model")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--adapter", required=True, help="folder written by save_adapter / finetune")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_merge)

    p = sub.add_parser("bench", help="run a side-by-side benchmark script (source checkout)")
    p.add_argument("which", choices=["s2ft", "sltrain"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_bench)

    p = sub.add_parser("tune", help="pre-autotune the kernels of a model's shapes (GPU), or --clear the cache")
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
        module.add_parser(sub)
    for command, module_name in _DELEGATED.items():
        if command in sub.choices and sub.choices[command].get_default("func") is None:
            sub.choices[command].set_defaults(func=importlib.import_module(module_name).run)
    return parser


# What `pip install fxsparse[app]` adds to the library's dependencies (pyproject.toml).
_APP_EXTRAS = {"tqdm", "gguf", "matplotlib", "numpy"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
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
