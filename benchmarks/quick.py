"""Every benchmark at toy size, one after the other: a smoke run of the whole measuring kit in about a minute.

Each benchmark runs in its own process with its smallest settings (tiny random models, a few steps) and
writes nothing under ``benchmarks/results/`` (the ones that always write get a temporary folder). What this
checks is that every benchmark still runs end to end on the current code; the figures it prints are not
results (toy shapes on a shared machine). ``fxsparse bench --quick`` runs it; CI runs it
(``tests/benchmarks/test_quick.py``).

    python benchmarks/quick.py                 # all of them
    python benchmarks/quick.py --only s2ft,compile
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> arguments after the script, given a scratch folder. Kept to the smallest settings each script has.
QUICK: dict[str, tuple[str, list[str]]] = {
    "s2ft": ("bench_s2ft.py", ["--tiny"]),
    # one eager and one fxsparse-compiled provider: compiling all of them is most of a minute on 2 cores
    "compile": ("bench_compile.py", ["--tiny", "--providers", "floor", "s2ft_fxsparse"]),
    "sltrain_block": ("bench_sltrain_block.py", ["--tiny"]),
    "gpu_kernels": ("gpu_kernels.py", ["--toy"]),
    "zoo": ("zoo.py", ["--arch", "llama,gpt2,mixtral", "--jobs", "0"]),  # a subset never writes the table
    "scaling": ("scaling.py", ["--tiny", "--seqs", "16", "--down-ratios", "0.2"]),
    "finetune_quality": ("finetune_quality.py", ["--tiny", "--methods", "s2ft,lora,supertuning"]),
    "pretrain_compare": ("pretrain_compare.py", [
        "--preset", "9m", "--recipes", "dense", "sltrain-block", "--steps", "2", "--eval-every", "1",
        "--eval-batches", "1", "--seq-len", "32",
        "--batch-size", "2", "--tokenizer", "bytes", "--allow-dirty", "--data", "{data}",
        "--runs", "{scratch}/runs", "--results", "{scratch}/results"]),
}


def _corpus(scratch: Path) -> Path:
    """A small text corpus for the pre-training smoke run: this repository's own Python sources."""
    folder = scratch / "corpus"
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted((HERE.parent / "fxsparse").rglob("*.py"))[:40]:
        (folder / (path.stem + ".txt")).write_text(path.read_text())
    return folder


def run(only: list[str] | None = None, timeout: float = 600.0) -> dict[str, tuple[int, float]]:
    """Run each benchmark's toy mode; ``{name: (exit status, seconds)}``. Output goes to this process's."""
    names = list(QUICK) if not only else only
    unknown = [n for n in names if n not in QUICK]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; known: {list(QUICK)}")
    outcome: dict[str, tuple[int, float]] = {}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with tempfile.TemporaryDirectory(prefix="fxsparse-bench-quick-") as tmp:
        scratch = Path(tmp)
        data = _corpus(scratch) if "pretrain_compare" in names else scratch
        for name in names:
            script, extra = QUICK[name]
            args = [a.format(scratch=scratch, data=data) for a in extra]
            print(f"== {name}: python benchmarks/{script} {' '.join(extra)}", flush=True)
            start = time.perf_counter()
            try:
                status = subprocess.run([sys.executable, str(HERE / script), *args], cwd=HERE.parent, env=env,
                                        timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                status = 124
            outcome[name] = (status, time.perf_counter() - start)
            print(f"== {name}: {'ok' if status == 0 else f'FAILED (exit {status})'} in {outcome[name][1]:.1f} s",
                  flush=True)
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {', '.join(QUICK)}")
    args = parser.parse_args(argv)
    outcome = run(args.only.split(",") if args.only else None)
    failed = [name for name, (status, _) in outcome.items() if status != 0]
    total = sum(seconds for _, seconds in outcome.values())
    print(f"{len(outcome) - len(failed)}/{len(outcome)} benchmarks ran in {total:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
