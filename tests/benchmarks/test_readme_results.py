"""The README's results section is what benchmarks/readme_results.py makes of the committed CSVs."""

from __future__ import annotations

import csv
import importlib.util
import io
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("readme_results", ROOT / "benchmarks" / "readme_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_section_matches_the_csvs():
    module = _module()
    assert module.main(["--check"]) == 0, "run: python benchmarks/readme_results.py"


def test_every_figure_in_the_section_comes_from_the_latest_csv_rows():
    module = _module()
    text = module.section()
    with open(ROOT / "benchmarks" / "results" / "s2ft_vs_lora.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows = [r for r in rows if not r["git_rev"].endswith("-dirty")]
    last = [r for r in rows if (r["date"], r["git_rev"]) == (rows[-1]["date"], rows[-1]["git_rev"])]
    for row in last:
        cells = f"| {row['provider']} | {float(row['median_ms']):.0f} | {row['min_ms']} | {row['ratio_to_lora']} |"
        assert cells in text
        assert row["git_rev"] in text and row["device"] in text


def test_a_changed_csv_makes_the_check_fail(monkeypatch, tmp_path):
    module = _module()
    source = ROOT / "benchmarks" / "results" / "compile.csv"
    rows = list(csv.DictReader(io.StringIO(source.read_text())))
    rows[-1]["median_ms"] = str(float(rows[-1]["median_ms"]) + 100.0)
    changed = tmp_path / "compile.csv"
    with open(changed, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for other in (ROOT / "benchmarks" / "results").glob("*.csv"):
        if other.name != "compile.csv":
            (tmp_path / other.name).write_text(other.read_text())
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    assert module.main(["--check"]) == 1


def test_missing_markers_are_refused():
    module = _module()
    with pytest.raises(SystemExit, match="markers"):
        module.replace_section("# a README without the markers\n", module.section())


def test_rows_from_a_dirty_tree_never_reach_the_readme():
    module = _module()
    rows = [{"date": "d1", "git_rev": "abc", "provider": "x"}, {"date": "d2", "git_rev": "abc-dirty", "provider": "y"}]
    assert module._latest(rows, lambda r: (r["date"], r["git_rev"])) == rows[:1]
    assert module._latest(rows[1:], lambda r: (r["date"], r["git_rev"])) == []
