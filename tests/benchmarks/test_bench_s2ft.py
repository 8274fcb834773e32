"""benchmarks/bench_s2ft.py: the PEFT peers it builds, the memory it counts, one toy run end to end."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from _bench import BENCH, benchmark_module

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("bench_s2ft") as module:
        yield module


@pytest.fixture(scope="module")
def base():
    from fxsparse.models import tiny_model

    torch.manual_seed(0)
    return tiny_model("llama")


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_live_tensor_peak_counts_outputs_until_freed(bench):
    with bench.LiveTensorPeak() as tracker:
        a = torch.ones(1000)                # 4000 bytes
        b = a * 2                           # 8000 live
        assert tracker.current == 8000
        del b                               # back to 4000
        assert tracker.current == 4000
        v = a.view(10, 100)                 # a view: no new storage
        c = torch.cat([a, a])               # 4000 + 8000 = 12000: the peak
        del c
        d = a + 1                           # 8000 again, below the peak
    assert (tracker.peak, tracker.current) == (12000, 8000)
    del v, d


def test_live_tensor_peak_counts_the_given_tensors_once_and_backward(bench):
    w = torch.randn(32, 32, requires_grad=True)   # 4 KiB, given: counted from the start, once
    x = torch.randn(8, 32)                        # 1 KiB
    with bench.LiveTensorPeak([w, w.view(-1), x]) as tracker:
        assert tracker.current == 4096 + 1024
        (x @ w).square().sum().backward()
    # after backward only the gradient of w (4 KiB) is new: the loss and the saved tensors are gone
    assert tracker.current == 4096 + 1024 + 4096
    # x @ w (1 KiB) and its square (1 KiB) were alive together with w and x
    assert tracker.peak >= 4096 + 1024 + 2048


def test_supertuning_sparsity_matches_the_budget(bench, base):
    budget = 3_000
    sparsity = bench.supertuning_sparsity(base, budget)
    model = bench.build_peft(base, "supertuning", budget=budget)
    trainable = _trainable(model)
    layers = len(bench.target_linears(base))
    assert abs(trainable - budget) <= layers, (trainable, budget, sparsity)
    with pytest.raises(ValueError, match="does not fit"):
        bench.supertuning_sparsity(base, 10**9)


def test_supra_splits_the_budget_between_rank_and_sparse_entries(bench, base):
    per_rank = bench.lora_params_per_rank(base)
    budget = 6 * per_rank
    model = bench.build_peft(base, "supra", budget=budget)
    lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora" in n)
    assert lora == 3 * per_rank
    layers = len(bench.target_linears(base))
    assert abs(_trainable(model) - budget) <= layers


def test_shira_and_dora_have_lora_counts(bench, base):
    lora = _trainable(bench.build_lora(base, rank=4))
    assert lora == 4 * bench.lora_params_per_rank(base)
    assert _trainable(bench.build_peft(base, "shira", rank=4)) == lora
    # DoRA adds one magnitude per output feature of each target
    extra = sum(m.out_features for m in bench.target_linears(base))
    assert _trainable(bench.build_peft(base, "dora", rank=4)) == lora + extra


def test_matched_rank_is_the_nearest(bench, base):
    per_rank = bench.lora_params_per_rank(base)
    assert bench.matched_rank(base, int(3.4 * per_rank)) == 3
    assert bench.matched_rank(base, int(3.6 * per_rank)) == 4
    assert bench.matched_rank(base, 1) == 1


def test_parse_providers_rejects_unknown_and_repeated(bench):
    assert bench.parse_providers("shira,s2ft") == ["shira", "s2ft"]
    for bad in ("lora,qlora", "lora,lora", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_providers(bad)


def test_toy_run_of_a_subset_gives_rows_with_blank_missing_ratios(bench):
    args = argparse.Namespace(threads=1, tiny=True, batch=1, seq=16, builder="auto", warmup=1, repeats=1,
                              rank=None, providers=["s2ft", "shira", "supertuning"])
    rows = bench.run(args)
    assert [r["provider"] for r in rows] == ["s2ft", "shira", "supertuning"]
    for row in rows:
        assert row["ratio_to_lora"] == "" and row["ratio_to_full"] == ""  # neither reference was run
        assert float(row["peak_mb"]) > float(row["peak_extra_mb"]) > 0
        assert row["saved_mb"] and row["opt_state_mb"]  # toy sizes round to 0.0 MB
    by_name = {r["provider"]: r for r in rows}
    budget = int(by_name["s2ft"]["trainable_params"])
    assert abs(int(by_name["supertuning"]["trainable_params"]) - budget) <= 14  # 2 blocks x 7 targets


def test_append_keeps_old_rows_and_the_report_reads_old_and_new(bench, tmp_path, monkeypatch):
    import shutil

    path = tmp_path / "s2ft_vs_lora.csv"
    shutil.copyfile(BENCH / "results" / "s2ft_vs_lora.csv", path)
    before = path.read_bytes()
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    monkeypatch.setattr(bench, "CSV_PATH", path)
    monkeypatch.setattr(bench, "MD_PATH", tmp_path / "s2ft_vs_lora.md")
    monkeypatch.setattr(bench, "PNG_PATH", tmp_path / "s2ft_vs_lora.png")
    new = [{field: "1" for field in bench.FIELDS} | {"provider": name, "date": "2099-01-01 00:00", "git_rev": "x"}
           for name in ("s2ft", "shira")]
    bench.append_csv(new)
    after = path.read_bytes()
    assert after[after.index(b"\n"):].startswith(before[before.index(b"\n"):])  # every earlier row unchanged
    rows = bench.read_csv()
    assert rows[0]["peak_mb"] == "" and rows[-1]["provider"] == "shira" and rows[-1]["peak_mb"] == "1"
    bench.write_markdown(rows)
    bench.write_plot(rows)
    assert "| shira |" in (tmp_path / "s2ft_vs_lora.md").read_text()
    assert (tmp_path / "s2ft_vs_lora.png").stat().st_size > 0
