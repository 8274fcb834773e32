"""benchmarks/pretrain_compare.py --seeds: per-seed rows, mean ± spread, optimizer state, append-only CSV."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from _bench import BENCH, benchmark_module

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compare():
    with benchmark_module("pretrain_compare") as module:
        yield module


def _row(compare, **values):
    return {field: values.get(field, "1") for field in compare.FIELDS}


def test_seed_summary_mean_spread_and_ratio_to_dense_of_the_same_seed(compare):
    rows = [{"recipe": "dense", "seed": "0", "final_val_ppl": "100"}, {"recipe": "dense", "seed": "1",
                                                                       "final_val_ppl": "200"},
            {"recipe": "sltrain", "seed": "0", "final_val_ppl": "90"}, {"recipe": "sltrain", "seed": "1",
                                                                        "final_val_ppl": "220"}]
    dense, sltrain = compare.seed_summary(rows)
    assert (dense["mean"], dense["min"], dense["max"], dense["ratio"]) == (150.0, 100.0, 200.0, 1.0)
    assert sltrain["std"] == pytest.approx(91.9239, rel=1e-5)
    assert sltrain["ratio"] == pytest.approx((0.9 + 1.1) / 2)  # per seed, not the ratio of the means


def test_append_keeps_old_rows_byte_for_byte(compare, tmp_path):
    old = tmp_path / "pretrain_compare.csv"
    shutil.copyfile(BENCH / "results" / "pretrain_compare.csv", old)
    before = old.read_bytes()
    compare.append_rows(old, [_row(compare, run_id="new", seed="2", optimizer_state_bytes="8")])
    after = old.read_bytes()
    header_end = before.index(b"\n") + 1
    body = before[header_end:]
    assert after[after.index(b"\n") + 1:].startswith(body)  # every earlier row unchanged
    with open(old, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[-1]["run_id"] == "new" and rows[-1]["seed"] == "2"
    assert rows[0]["seed"] is None and rows[0]["final_val_ppl"]  # an old row: no seed column of its own
    compare.append_rows(old, [_row(compare, run_id="newer")])  # the header is current now: plain append
    assert old.read_bytes().startswith(after)


def test_append_refuses_a_foreign_header(compare, tmp_path):
    path = tmp_path / "pretrain_compare.csv"
    path.write_text("run_id,something_else\n")
    with pytest.raises(SystemExit):
        compare.append_rows(path, [_row(compare)])


def test_two_seeds_two_recipes_toy_run(compare, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in sorted((ROOT / "fxsparse").glob("*.py"))[:8]:
        (corpus / f"{path.stem}.txt").write_text(path.read_text())
    compare.main(["--preset", "9m", "--steps", "1", "--eval-every", "1", "--eval-batches", "1", "--seq-len", "16",
                  "--batch-size", "1", "--tokenizer", "bytes", "--allow-dirty", "--data", str(corpus),
                  "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results"), "--threads", "1",
                  "--recipes", "dense", "sltrain-random", "--seeds", "0,1"])
    with open(tmp_path / "results" / "pretrain_compare.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["recipe"], r["seed"]) for r in rows] == [("dense", "0"), ("sltrain-random", "0"), ("dense", "1"),
                                                        ("sltrain-random", "1")]
    for r in rows:
        # AdamW: two fp32 moments per trainable parameter plus one step counter per tensor
        assert 8 * int(r["params_trainable"]) < int(r["optimizer_state_bytes"]) < 8 * int(r["params_trainable"]) + 4096
        assert (tmp_path / "results" / compare.curves_name(r)).exists()
    # different seeds: different initial weights and support, so different perplexities
    assert rows[0]["final_val_ppl"] != rows[2]["final_val_ppl"]
    report = (tmp_path / "results" / "pretrain_compare.md").read_text()
    assert "seeds 0, 1" in report and " ± " in report
    assert (tmp_path / "results" / "pretrain_compare.png").stat().st_size > 0
