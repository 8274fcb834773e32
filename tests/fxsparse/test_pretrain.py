"""Tests for fxsparse.app.pretrain: presets, schedule, data order, gradient accumulation and exact resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fxsparse.app.corpus import ByteTokenizer
from fxsparse.app.loop import lr_factor
from fxsparse.app.pretrain import (
    PRESETS,
    Preset,
    TrainBatches,
    accumulate_gradients,
    apply_recipe,
    build_model,
    parse_args,
    preset_from_config,
    run,
)

TINY = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4}


@pytest.fixture(autouse=True)
def _private_cache_and_threads(tmp_path, monkeypatch):
    monkeypatch.setenv("FXSPARSE_CACHE_DIR", str(tmp_path / "cache"))
    # the runs below pass --threads 1 (tiny shapes gain nothing from a second thread on a shared machine);
    # give later test files the thread count they started with
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_setup(tmp_path):
    """A 10-document corpus of real-ish text and a tiny model config, both in the test's tmp dir."""
    rng = np.random.default_rng(0)
    words = "the model trains a sparse plus low rank weight on text from the python documentation".split()
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(10):
        (docs / f"d{i}.txt").write_text(" ".join(rng.choice(words, size=150)) + "\n")
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    return docs, config


def _args(tiny_setup, out, *extra: str):
    docs, config = tiny_setup
    base = ["--config", str(config), "--data", str(docs), "--tokenizer", "bytes", "--seq-len", "32",
            "--batch-size", "2", "--eval-every", "3", "--eval-batches", "2", "--warmup", "2",
            "--val-fraction", "0.2", "--no-progress", "--threads", "1", "--out", str(out)]
    return parse_args([*base, *extra])


def test_presets_param_count_matches_built_model():
    for preset in (Preset("t", 32, 48, 2, 4), PRESETS["9m"]):
        model = build_model(preset, vocab_size=300, max_positions=64, seed=0)
        assert preset.param_count(300) == sum(p.numel() for p in model.parameters())
    # the papers' names count parameters with LLaMA's 32k vocabulary
    for name, size in [("60m", 60e6), ("130m", 130e6), ("350m", 350e6), ("1b", 1.3e9)]:
        assert 0.75 < PRESETS[name].param_count(32000) / size < 1.1, name
    assert (PRESETS["60m"].hidden_size, PRESETS["60m"].intermediate_size, PRESETS["60m"].num_layers,
            PRESETS["60m"].num_heads) == (512, 1376, 8, 8)


def test_preset_validation_and_config_file(tmp_path):
    with pytest.raises(ValueError, match="hidden_size 30 is not divisible by num_heads 4"):
        Preset("bad", 30, 64, 2, 4)
    with pytest.raises(ValueError, match="num_layers"):
        Preset("bad", 32, 64, 0, 4)
    path = tmp_path / "llama.json"
    path.write_text(json.dumps({**TINY, "model_type": "llama", "rope_theta": 10000.0}))
    assert preset_from_config(path) == Preset("llama", 32, 48, 2, 4)
    path.write_text(json.dumps({"hidden_size": 32}))
    with pytest.raises(ValueError, match="intermediate_size"):
        preset_from_config(path)
    with pytest.raises(ValueError, match="missing.json"):
        preset_from_config(tmp_path / "missing.json")


@pytest.mark.parametrize("warmup,total,floor", [(10, 110, 0.1), (0, 37, 0.0), (5, 6, 0.2)])
def test_pretrain_schedule_shape(warmup, total, floor):
    # pretrain's cosine reaches the floor at step `steps`, one past its last step
    def f(step):
        return lr_factor(step, total, warmup, "cosine", floor, floor_after_last=True)

    values = [f(s) for s in range(total + 1)]
    ramp, decay = values[:warmup], values[warmup:]
    assert all(a < b for a, b in zip(ramp, ramp[1:], strict=False))
    if warmup:
        assert ramp[-1] == 1.0 and ramp[0] == 1.0 / warmup
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))
    assert decay[0] == 1.0
    assert math.isclose(values[-1], floor, abs_tol=1e-12)
    if total - warmup >= 2 and (total - warmup) % 2 == 0:
        assert math.isclose(f(warmup + (total - warmup) // 2), floor + (1 - floor) / 2, rel_tol=1e-12)


def test_train_batches_cover_each_epoch_and_resume(tmp_path):
    sequences = torch.arange(11 * 4).reshape(11, 4)
    batches = TrainBatches(sequences, batch_size=3, seed=5)
    epoch0 = torch.cat([batches.next() for _ in range(3)])
    # 11 rows / 3 per batch: one epoch is 3 batches of distinct rows, the ragged tail of 2 is dropped
    assert len({tuple(r) for r in epoch0.tolist()}) == 9
    state = batches.state_dict()
    upcoming = [batches.next() for _ in range(5)]
    restored = TrainBatches(sequences, batch_size=3, seed=5)
    restored.load_state_dict(state)
    for expected in upcoming:
        assert torch.equal(restored.next(), expected)
    other_seed = TrainBatches(sequences, batch_size=3, seed=6)
    assert not torch.equal(torch.cat([other_seed.next() for _ in range(3)]), epoch0)
    with pytest.raises(ValueError, match="batch_size 12"):
        TrainBatches(sequences, batch_size=12, seed=0)


def test_gradient_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    model = build_model(Preset("t", 32, 48, 2, 4), vocab_size=97, max_positions=16, seed=1).double()
    batch = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(2))
    big_loss = accumulate_gradients(model, [batch])
    big = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    small_loss = accumulate_gradients(model, [batch[:2], batch[2:]])
    assert math.isclose(big_loss, small_loss, rel_tol=1.3e-6)
    assert all(g.abs().sum() > 0 for g in big)
    # transformers computes the cross-entropy in float32 (it upcasts logits with .float()), so the
    # gradients carry float32 rounding even in a float64 model: float32's default tolerances apply
    for expected, param in zip(big, model.parameters(), strict=True):
        torch.testing.assert_close(param.grad, expected, rtol=1.3e-6, atol=1e-5)


def _checkpoint(out):
    return torch.load(out / "checkpoint.pt", weights_only=False)


def _assert_same_state(a, b):
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for index in opt_a:
        for name in opt_a[index]:
            assert torch.equal(torch.as_tensor(opt_a[index][name]), torch.as_tensor(opt_b[index][name])), name
    assert a["scheduler"] == b["scheduler"]
    assert a["data"] == b["data"]
    assert [h["train_loss"] for h in a["metrics"]["history"]] == [h["train_loss"] for h in b["metrics"]["history"]]
    assert a["metrics"]["evals"][-1]["val_loss"] == b["metrics"]["evals"][-1]["val_loss"]


RESUME_CASES = [
    pytest.param("dense", ["--grad-accum", "2"], id="dense-fp32-accum2"),
    pytest.param("dense", ["--dtype", "bf16"], id="dense-bf16"),
    pytest.param("sltrain", ["--sparsity", "0.1", "--support", "random"], id="sltrain-random"),
    pytest.param("sltrain", ["--sparsity", "0.1", "--support", "block", "--block-size", "8", "--dtype", "bf16"],
                 id="sltrain-block-bf16"),
    pytest.param("lowrank", [], id="lowrank"),
]


@pytest.mark.parametrize("recipe,extra", RESUME_CASES)
def test_resume_is_bit_exact(tiny_setup, tmp_path, recipe, extra):
    common = ["--recipe", recipe, "--steps", "6", "--rank", "4", *extra]
    straight = run(_args(tiny_setup, tmp_path / "straight", *common))
    run(_args(tiny_setup, tmp_path / "split", *common, "--stop-at", "3"))
    half = _checkpoint(tmp_path / "split")
    assert half["step"] == 3 and len(half["metrics"]["history"]) == 3
    resumed = run(_args(tiny_setup, tmp_path / "split", *common, "--resume"))
    _assert_same_state(_checkpoint(tmp_path / "straight"), _checkpoint(tmp_path / "split"))
    assert resumed["final_val_ppl"] == straight["final_val_ppl"]
    assert [e["step"] for e in resumed["evals"]] == [3, 6]
    if recipe != "dense":
        assert straight["params_non_embedding"] < run_dense_params(tiny_setup, tmp_path)


def run_dense_params(tiny_setup, tmp_path) -> int:
    model = build_model(preset_from_config(tiny_setup[1]), len(ByteTokenizer()), 32, seed=0)
    return sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)


def test_resume_refuses_changed_settings_and_missing_checkpoint(tiny_setup, tmp_path):
    run(_args(tiny_setup, tmp_path / "a", "--recipe", "dense", "--steps", "4", "--stop-at", "2"))
    for changed, flag in [(["--seq-len", "16"], "--seq-len"), (["--seed", "1"], "--seed"),
                          (["--warmup", "1"], "--warmup"), (["--recipe", "lowrank", "--rank", "4"], "--recipe")]:
        with pytest.raises(ValueError, match=f"--resume: {flag}.*checkpoint.*--overwrite"):
            run(_args(tiny_setup, tmp_path / "a", "--recipe", "dense", "--steps", "4", *changed, "--resume"))
    with pytest.raises(ValueError, match="does not exist"):
        run(_args(tiny_setup, tmp_path / "b", "--recipe", "dense", "--steps", "4", "--resume"))
    longer = run(_args(tiny_setup, tmp_path / "a", "--recipe", "dense", "--steps", "5", "--resume"))
    assert longer["steps_done"] == 5 and "--steps is 5 in this run, 4" in longer["resume_notes"][0]


def test_resume_with_another_lr_applies_it_and_records_it(tiny_setup, tmp_path, capsys):
    run(_args(tiny_setup, tmp_path / "a", "--recipe", "dense", "--steps", "4", "--stop-at", "2", "--lr", "0.003"))
    capsys.readouterr()
    metrics = run(_args(tiny_setup, tmp_path / "a", "--recipe", "dense", "--steps", "4", "--lr", "0.01", "--resume"))
    assert "--lr is 0.01 in this run, 0.003 in the checkpoint" in capsys.readouterr().out
    lrs = [h["lr"] for h in metrics["history"]]
    # warm-up 2 then cosine to the 0.1 floor at step 4: steps 3 and 4 use the new peak 0.01
    expected = [0.003 * 0.5, 0.003] + [0.01 * lr_factor(s, 4, 2, "cosine", 0.1, floor_after_last=True) for s in (2, 3)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    on_disk = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert on_disk["config"]["lr"] == 0.01 and on_disk["resume_notes"] and on_disk["history"][-1]["lr"] == lrs[-1]


def test_training_learns_and_writes_outputs(tiny_setup, tmp_path):
    out = tmp_path / "run"
    metrics = run(_args(tiny_setup, out, "--recipe", "dense", "--steps", "30", "--eval-every", "10",
                        "--batch-size", "4", "--lr", "0.01"))
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["final_val_ppl"] == metrics["final_val_ppl"]
    assert (out / "curves.png").stat().st_size > 1000
    ppl = [e["val_ppl"] for e in metrics["evals"]]
    assert len(ppl) == 3
    # 257 byte ids at random init: perplexity near 257; text of 14 words must fall far below that
    assert ppl[0] > ppl[-1] and ppl[-1] < 40, ppl
    assert metrics["tokens_seen"] == 30 * 4 * 32
    assert metrics["params_trainable"] == metrics["params_total"]


def test_bad_arguments_name_the_value(tiny_setup, tmp_path):
    with pytest.raises(ValueError, match="--grad-accum"):
        run(_args(tiny_setup, tmp_path / "x", "--grad-accum", "0"))
    with pytest.raises(ValueError, match="'7m'"):
        run(parse_args(["--preset", "7m", "--out", str(tmp_path / "y")]))
    with pytest.raises(ValueError, match="--stop-at"):
        run(_args(tiny_setup, tmp_path / "z", "--steps", "3", "--stop-at", "5"))


@pytest.mark.parametrize("recipe,options", [
    ("lowrank", {"rank": 4, "seed": 0}),
    ("sltrain", {"rank": 4, "sparsity": 0.1, "seed": 0}),
])
def test_every_block_factor_gets_a_gradient_from_scratch(recipe, options):
    # a low-rank-only model with B = 0 everywhere sits on a saddle where every block gradient is exactly
    # zero; pretrain initialises B randomly for it, SLTrain's sparse part breaks the symmetry by itself
    model = apply_recipe(build_model(Preset("t", 32, 48, 2, 4), vocab_size=97, max_positions=16, seed=1),
                         recipe, options)
    batch = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    # two plain SGD steps: at step 0 A has no gradient while B = 0 (LoRA-style), from step 1 on it must
    accumulate_gradients(model, [batch])
    with torch.no_grad():
        for param in model.parameters():
            param -= 0.1 * param.grad
    model.zero_grad(set_to_none=True)
    accumulate_gradients(model, [batch])
    factors = [(n, p) for n, p in model.named_parameters() if n.endswith((".A", ".B"))]
    assert len(factors) == 2 * 7 * 2
    for name, param in factors:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    first = apply_recipe(build_model(Preset("t", 32, 48, 2, 4), 97, 16, seed=1), recipe, options)
    again = apply_recipe(build_model(Preset("t", 32, 48, 2, 4), 97, 16, seed=1), recipe, options)
    for (name, param), other in zip(first.named_parameters(), again.parameters(), strict=True):
        assert torch.equal(param, other), f"{name} is not deterministic in the seed"
    if recipe == "lowrank":
        assert all(p.abs().sum() > 0 for n, p in first.named_parameters() if n.endswith(".B"))


def test_rerun_into_an_earlier_run_needs_resume_or_overwrite(tiny_setup, tmp_path):
    out = tmp_path / "a"
    run(_args(tiny_setup, out, "--recipe", "dense", "--steps", "2"))
    before = (out / "metrics.json").read_text()
    with pytest.raises(ValueError, match=r"already holds.*--resume.*--overwrite") as info:
        run(_args(tiny_setup, out, "--recipe", "dense", "--steps", "2"))
    assert str(out) in str(info.value) and (out / "metrics.json").read_text() == before
    with pytest.raises(ValueError, match=r"--resume and --overwrite"):
        run(_args(tiny_setup, out, "--recipe", "dense", "--steps", "2", "--resume", "--overwrite"))
    again = run(_args(tiny_setup, out, "--recipe", "dense", "--steps", "3", "--overwrite"))
    assert again["steps_done"] == 3 and len(again["history"]) == 3
    assert json.loads((out / "metrics.json").read_text())["steps_done"] == 3


def test_non_finite_loss_stops_before_the_checkpoint(tiny_setup, tmp_path, monkeypatch):
    import fxsparse.app.pretrain

    real = fxsparse.app.pretrain.accumulate_gradients
    calls = {"n": 0}

    def inf_at_step_two(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return float("inf") if calls["n"] == 2 else loss

    monkeypatch.setattr(fxsparse.app.pretrain, "accumulate_gradients", inf_at_step_two)
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"inf at step 2"):
        run(_args(tiny_setup, out, "--recipe", "dense", "--steps", "3", "--save-every", "1"))
    assert _checkpoint(out)["step"] == 1
    assert not (out / "metrics.json").exists()
