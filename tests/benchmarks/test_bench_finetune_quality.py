"""benchmarks/finetune_quality.py: shifted data, matched budgets, perplexity, and a toy run end to end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from _bench import benchmark_module

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fq():
    with benchmark_module("finetune_quality") as module:
        yield module


@pytest.fixture(scope="module")
def base():
    from fxsparse.models import tiny_model

    torch.manual_seed(0)
    return tiny_model("llama")


def test_splits_are_disjoint_and_the_shifts_really_shift(fq):
    data = fq.task_data("add", train_n=60, val_n=20, test_n=30, seed=0)
    prompts = {name: {e.prompt for e in data[name]} for name in data}
    assert [len(data[n]) for n in ("train", "val", "test", "longer", "format")] == [60, 20, 30, 30, 30]
    assert not prompts["train"] & prompts["val"] and not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]
    for e in data["longer"]:  # three-digit operands, sums checked
        a, b = (int(t.strip("?")) for t in e.prompt.split()[2::2])
        assert 100 <= a <= 999 and 100 <= b <= 999 and e.response == str(a + b)
    for e in data["format"]:
        assert e.prompt.startswith("Compute ") and " plus " in e.prompt
        a, b = (int(t.strip(".")) for t in e.prompt.split()[1::2])
        assert e.response == str(a + b)
    for e in data["train"] + data["test"]:
        assert e.prompt.startswith("What is ") and len(e.response) <= 3
    assert fq.task_data("add", 60, 20, 30, seed=0)["longer"] == data["longer"]  # deterministic


@pytest.mark.parametrize("task", ["reverse", "sort-digits"])
def test_other_tasks_shift_too(fq, task):
    longer = fq.shifted_examples(task, "longer", 10)
    fmt = fq.shifted_examples(task, "format", 10)
    assert all(len(e.response.replace(", ", "")) >= 8 for e in longer)
    assert len({e.prompt for e in fmt}) == 10
    if task == "reverse":
        assert all(e.response == e.prompt.split("'")[1][::-1] for e in longer + fmt)


def test_perplexity_is_exp_of_the_mean_token_loss(fq, base):
    ids = torch.randint(0, base.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = base(input_ids=ids).logits[:, :-1].double()
    expected = math.exp(float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                                ids[:, 1:].reshape(-1))))
    assert fq.perplexity(base, ids, batch_size=2) == pytest.approx(expected, rel=1e-4)


def test_methods_are_built_at_the_matched_budget(fq, base):
    import bench_s2ft

    s2ft, _ = fq.build_method("s2ft", base, 0, seed=0)
    budget = fq._trainable(s2ft)
    lora, info = fq.build_method("lora", base, budget, seed=0)
    assert info["lora_rank"] == bench_s2ft.matched_rank(base, budget)
    shira, _ = fq.build_method("shira", base, budget, seed=0)
    assert fq._trainable(shira) == fq._trainable(lora)
    sparse, info = fq.build_method("supertuning", base, budget, seed=0)
    assert abs(fq._trainable(sparse) - budget) <= len(bench_s2ft.target_linears(base))
    # the seed draws S²FT's units and SHiRA's mask
    other, _ = fq.build_method("s2ft", base, 0, seed=1)
    assert fq._trainable(other) == budget
    assert any(not torch.equal(a, b) for a, b in zip(s2ft.buffers(), other.buffers(), strict=False))


def test_toy_run_selects_a_learning_rate_and_reports_seeds(fq, tmp_path):
    fq.main(["--tiny", "--methods", "s2ft,lora", "--seeds", "0,1", "--threads", "1", "--out", str(tmp_path)])
    with open(tmp_path / "finetune_quality.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["method"], r["seed"], r["chosen"]) for r in rows][0] == ("base", "", "1")
    s2ft = [r for r in rows if r["method"] == "s2ft"]
    grid = fq.DEFAULT_GRIDS["s2ft"]
    assert sorted(float(r["lr"]) for r in s2ft if r["seed"] == "0") == [grid[0], grid[-1]]  # the grid, first seed
    chosen = [r for r in s2ft if r["chosen"] == "1"]
    assert [r["seed"] for r in chosen] == ["0", "1"] and len({r["lr"] for r in chosen}) == 1
    dropped = [r for r in s2ft if r["chosen"] == "0"]
    assert len(dropped) == 1 and dropped[0]["test_em"] == ""  # test sets are for the chosen rate only
    for r in chosen + [r for r in rows if r["method"] == "lora"]:
        assert 0 <= float(r["test_em"]) <= 1 and r["ppl_after"] and r["val_loss"]
        assert float(r["ppl_change"]) == pytest.approx(float(r["ppl_after"]) / float(r["ppl_before"]) - 1, abs=1e-3)
    report = (tmp_path / "finetune_quality.md").read_text()
    assert "| s2ft | 528 |" in report and " ± " in report
    assert (tmp_path / "finetune_quality.png").stat().st_size > 0


def test_an_interrupted_run_resumes_without_training_again(fq, tmp_path, monkeypatch):
    argv = ["--tiny", "--methods", "s2ft,lora", "--seeds", "0,1", "--threads", "1", "--out", str(tmp_path)]
    trained = []
    real = fq.fine_tune

    def counting(model, tokenizer, examples, args, lr, seed):
        trained.append((lr, seed))
        if len(trained) == 4 and fail:
            raise RuntimeError("cut off")  # the 4th training run (LoRA's first) is interrupted
        return real(model, tokenizer, examples, args, lr, seed)

    monkeypatch.setattr(fq, "fine_tune", counting)
    fail = True
    with pytest.raises(RuntimeError, match="cut off"):
        fq.main(argv)
    journal = tmp_path / fq.JOURNAL_NAME
    assert not (tmp_path / "finetune_quality.csv").exists() and journal.exists()
    done = [json.loads(line)["key"] for line in journal.read_text().splitlines()[1:]]
    lr = fq.DEFAULT_GRIDS["s2ft"]
    assert done[:3] == ["base", f"s2ft|{lr[0]:g}|0|0", f"s2ft|{lr[-1]:g}|0|0"] and len(done) == 5  # + 2 chosen
    with pytest.raises(SystemExit, match="other settings"):  # other settings never mix into that run
        fq.main([*argv, "--steps", "3", "--resume"])
    fail, trained[:] = False, []
    fq.main([*argv, "--resume"])
    assert trained == [(fq.DEFAULT_GRIDS["lora"][-1], 0), (fq.DEFAULT_GRIDS["lora"][-1], 1)]  # S²FT's were kept
    rows = fq.read_csv(tmp_path / "finetune_quality.csv")
    assert len({r["run_id"] for r in rows}) == 1 and not journal.exists()
    assert [(r["method"], r["seed"], r["chosen"]) for r in rows if r["chosen"] == "1"] == [
        ("base", "", "1"), ("s2ft", "0", "1"), ("s2ft", "1", "1"), ("lora", "0", "1"), ("lora", "1", "1")]
