"""benchmarks/scaling.py: one toy run of both sweeps writes the rows and plots it promises."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from _bench import benchmark_module

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def scaling():
    with benchmark_module("scaling") as module:
        yield module


def test_toy_run_writes_both_sweeps(scaling, tmp_path):
    scaling.main(["--tiny", "--seqs", "8,16", "--down-ratios", "0.05,0.3", "--ratio-seq", "8", "--threads", "1",
                  "--out", str(tmp_path)])
    with open(tmp_path / "scaling.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == scaling.FIELDS
        rows = list(reader)
    seq = [r for r in rows if r["sweep"] == "seq"]
    ratio = [r for r in rows if r["sweep"] == "ratio"]
    assert [(r["seq"], r["provider"]) for r in seq] == [(s, p) for s in ("8", "16") for p in ("s2ft", "lora", "full")]
    assert len(ratio) == 6 and {r["seq"] for r in ratio} == {"8"}
    for r in rows:
        assert float(r["median_ms"]) > 0 and float(r["peak_mb"]) >= float(r["peak_extra_mb"]) > 0
        assert r["git_rev"] and r["device"] and r["run_id"] == rows[0]["run_id"]
    # longer sequences save more activations, for every provider
    for provider in ("s2ft", "lora", "full"):
        short, long = (float(r["saved_mb"]) for r in seq if r["provider"] == provider)
        assert long > short, provider
    # the ratio sweep: S²FT trains more as down grows; LoRA's rank is the nearest match to S²FT's count
    s2ft = [r for r in ratio if r["provider"] == "s2ft"]
    assert int(s2ft[1]["trainable_params"]) > int(s2ft[0]["trainable_params"])
    for r in s2ft:
        lora = next(x for x in ratio if x["provider"] == "lora" and x["s2ft_ratios"] == r["s2ft_ratios"])
        assert int(lora["lora_rank"]) == max(1, round(int(r["trainable_params"]) / (int(lora["trainable_params"])
                                                                                      / int(lora["lora_rank"]))))
        assert r["ratio_to_lora"] and lora["ratio_to_lora"] == "1.000"
    assert (tmp_path / "scaling_seq.png").stat().st_size > 0 and (tmp_path / "scaling_ratio.png").stat().st_size > 0


def test_latest_picks_the_last_run_of_each_sweep(scaling):
    rows = [{"run_id": "a", "sweep": "seq"}, {"run_id": "b", "sweep": "seq"}, {"run_id": "b", "sweep": "seq"},
            {"run_id": "c", "sweep": "ratio"}]
    assert scaling.latest(rows, "seq") == rows[1:3]
    assert scaling.latest(rows, "ratio") == rows[3:]
    assert scaling.latest([], "seq") == []
