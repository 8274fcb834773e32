"""`fxsparse bench --quick`: every benchmark still runs end to end at toy size (benchmarks/quick.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("quick", ROOT / "benchmarks" / "quick.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_benchmark_script_is_in_the_quick_run():
    module = _module()
    scripts = {script for script, _ in module.QUICK.values()}
    benchmarks = {p.name for p in (ROOT / "benchmarks").glob("*.py")} - {"_env.py", "quick.py", "readme_results.py"}
    assert benchmarks <= scripts, f"not in benchmarks/quick.py: {sorted(benchmarks - scripts)}"


def test_unknown_name_is_refused():
    with pytest.raises(ValueError, match="unknown benchmark"):
        _module().run(["nope"])


def test_bench_quick_runs_every_benchmark_and_writes_no_results(capsys):
    from fxsparse.app.cli import main

    module = _module()
    results = ROOT / "benchmarks" / "results"
    before = {p.name: p.stat().st_mtime_ns for p in results.iterdir()}
    assert main(["bench", "--quick"]) == 0
    out = capsys.readouterr().out
    for name in module.QUICK:
        assert f"== {name}: ok in" in out
    assert f"{len(module.QUICK)}/{len(module.QUICK)} benchmarks ran" in out
    assert {p.name: p.stat().st_mtime_ns for p in results.iterdir()} == before


def test_bench_quick_takes_no_benchmark_name():
    from fxsparse.app.cli import main

    assert main(["bench", "--quick", "s2ft"]) == 2
