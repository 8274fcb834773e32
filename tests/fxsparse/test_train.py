"""The fine-tuning loop: exact gradient accumulation, exact resume, schedules, argument checks."""

from __future__ import annotations

import math

import pytest
import torch

import fxsparse.app.loop
import fxsparse.app.train
from fxsparse.app.data import BatchStream, CharTokenizer, collate, encode_examples, task_splits
from fxsparse.app.train import (
    CHECKPOINT_NAME,
    NonFiniteLossError,
    accumulate_gradients,
    causal_lm_loss,
    check_out_dir,
    lr_factor,
    train,
    write_text_atomic,
)
from fxsparse.models import TINY_ARCHS, tiny_model

TOK = CharTokenizer()


def _encoded(n: int = 16, task: str = "arith", seed: int = 0):
    # arith prompts and answers vary in length, so batches carry real padding
    return encode_examples(TOK, task_splits(task, n, 0, seed=seed)[0])


def _model64(seed: int = 0) -> torch.nn.Module:
    return tiny_model("llama", seed=seed).to(torch.float64)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_loss_and_gradients_match_dense_full_logits_reference():
    encoded = _encoded(6)
    batch = collate(encoded, TOK.pad_token_id)
    assert len({len(e.prompt_ids) + len(e.response_ids) for e in encoded}) > 1  # padding present

    model = _model64()
    loss_sum, count = causal_lm_loss(model, batch)
    mean, total = accumulate_gradients(model, [batch])
    ours = _grads(model)
    model.zero_grad(set_to_none=True)

    # dense reference: every position's logits, shifted by hand, mean over the labelled ones
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    assert logits.dtype == torch.float64
    targets = batch["labels"][:, 1:]
    reference = torch.nn.functional.cross_entropy(logits[:, :-1][targets != -100], targets[targets != -100])
    reference.backward()
    theirs = _grads(model)
    assert count == total == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(loss_sum / count, reference.detach())
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), reference.detach())
    assert ours.keys() == theirs.keys() and len(ours) == len(list(model.parameters()))
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], msg=name)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_response_only_logits_give_the_dense_loss_on_every_architecture(arch):
    batch = collate(_encoded(5), TOK.pad_token_id)
    model = tiny_model(arch).to(torch.float64)
    loss_sum, count = causal_lm_loss(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    labelled = targets != -100
    reference = torch.nn.functional.cross_entropy(logits[:, :-1][labelled], targets[labelled], reduction="sum")
    assert count == int(labelled.sum())
    torch.testing.assert_close(loss_sum, reference)


def test_two_half_batches_accumulate_to_one_full_batch():
    encoded = _encoded(8)
    full = collate(encoded, TOK.pad_token_id)
    halves = [collate(encoded[:4], TOK.pad_token_id), collate(encoded[4:], TOK.pad_token_id)]
    # unequal token counts per half: a per-micro-batch mean would weight them wrongly
    counts = [int((h["labels"][:, 1:] != -100).sum()) for h in halves]
    assert counts[0] != counts[1]

    model = _model64()
    loss_full, _ = accumulate_gradients(model, [full])
    g_full = _grads(model)
    model.zero_grad(set_to_none=True)
    loss_halves, _ = accumulate_gradients(model, halves)
    g_halves = _grads(model)
    assert math.isclose(loss_full, loss_halves, rel_tol=1e-12)
    for name in g_full:
        torch.testing.assert_close(g_halves[name], g_full[name], msg=name)


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_grad_accum_training_equals_full_batch_training(max_grad_norm):
    encoded = _encoded(16)
    runs = {}
    for batch_size, grad_accum in [(4, 1), (2, 2)]:
        model = _model64()
        stream = BatchStream(encoded, batch_size=batch_size, pad_id=TOK.pad_token_id, seed=1)
        result = train(model, stream, steps=3, lr=1e-2, grad_accum=grad_accum, warmup_steps=1,
                       max_grad_norm=max_grad_norm, progress=False)
        runs[grad_accum] = (model.state_dict(), result.losses)
    (sd1, losses1), (sd2, losses2) = runs[1], runs[2]
    torch.testing.assert_close(torch.tensor(losses2), torch.tensor(losses1))
    changed = 0
    base = _model64().state_dict()
    for name in sd1:
        torch.testing.assert_close(sd2[name], sd1[name], msg=name)
        changed += not torch.equal(sd1[name], base[name])
    assert changed > 10  # training really moved the weights


class _Crash(RuntimeError):
    pass


class _CrashingStream(BatchStream):
    """A BatchStream that dies after ``limit`` batches, as a killed job would."""

    def __init__(self, *args, limit: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.limit = limit

    def __next__(self):
        if self.limit == 0:
            raise _Crash
        self.limit -= 1
        return super().__next__()


def _partly_frozen_model():
    model = tiny_model("llama", seed=2)
    # train a subset only, so the checkpoint must hold exactly the trainable parameters
    for name, p in model.named_parameters():
        p.requires_grad_("mlp" in name or "o_proj" in name)
    return model


def test_resume_is_bit_exact(tmp_path):
    encoded = _encoded(12, task="add")
    kwargs = dict(steps=6, lr=3e-3, grad_accum=2, warmup_steps=2, progress=False)

    straight = _partly_frozen_model()
    ref = train(straight, BatchStream(encoded, 3, TOK.pad_token_id, seed=5), **kwargs)

    interrupted = _partly_frozen_model()
    # 7 micro-batches: 3 full steps (checkpointed every step) and a crash inside the 4th step
    with pytest.raises(_Crash):
        train(interrupted, _CrashingStream(encoded, 3, TOK.pad_token_id, seed=5, limit=7),
              checkpoint_dir=tmp_path, checkpoint_every=1, **kwargs)
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["step"] == 3

    resumed = _partly_frozen_model()
    res = train(resumed, BatchStream(encoded, 3, TOK.pad_token_id, seed=5), checkpoint_dir=tmp_path,
                checkpoint_every=1, resume=True, **kwargs)
    assert res.resumed_from == 3 and res.steps == 6
    assert res.losses == ref.losses and res.lrs == ref.lrs and res.tokens == ref.tokens
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(straight.state_dict()["model.layers.0.mlp.up_proj.weight"],
                           _partly_frozen_model().state_dict()["model.layers.0.mlp.up_proj.weight"])

    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert saved["step"] == 6
    assert set(saved["trainable"]) == {n for n, p in resumed.named_parameters() if p.requires_grad}


def test_resume_rejects_mismatched_model(tmp_path):
    encoded = _encoded(8, task="add")
    train(_partly_frozen_model(), BatchStream(encoded, 4, 0), steps=1, lr=1e-3, checkpoint_dir=tmp_path,
          progress=False)
    other = tiny_model("llama")
    for name, p in other.named_parameters():
        p.requires_grad_("o_proj" in name)
    with pytest.raises(ValueError, match="does not match the model's trainable parameters"):
        train(other, BatchStream(encoded, 4, 0), steps=2, lr=1e-3, checkpoint_dir=tmp_path, resume=True,
              progress=False)
    with pytest.raises(ValueError, match="no checkpoint"):
        train(other, BatchStream(encoded, 4, 0), steps=2, lr=1e-3, resume=tmp_path / "none.pt", progress=False)


def test_training_lowers_the_loss():
    model = tiny_model("llama", seed=0)
    stream = BatchStream(_encoded(16, task="add"), 8, TOK.pad_token_id, seed=0)
    result = train(model, stream, steps=12, lr=1e-2, warmup_steps=3, progress=False)
    assert sum(result.losses[-3:]) / 3 < 0.7 * sum(result.losses[:3]) / 3


def test_lr_factor_schedules():
    cosine = [lr_factor(s, 10, 2, "cosine", 0.1) for s in range(10)]
    assert cosine[:2] == [0.5, 1.0]
    assert cosine[2] == 1.0 and math.isclose(cosine[-1], 0.1)
    assert all(a >= b for a, b in zip(cosine[1:], cosine[2:], strict=False))
    assert [lr_factor(s, 10, 3, "constant") for s in range(5)] == [1 / 3, 2 / 3, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=0), "steps must be >= 1, got 0"),
        (dict(grad_accum=0), "grad_accum must be >= 1, got 0"),
        (dict(lr=-1.0), "lr must be > 0, got -1.0"),
        (dict(schedule="linear"), "unknown schedule 'linear'"),
        (dict(checkpoint_every=2), "need a checkpoint_dir"),
    ],
)
def test_train_rejects_bad_arguments(kwargs, message):
    args = dict(steps=1, lr=1e-3, progress=False) | kwargs
    with pytest.raises(ValueError, match=message):
        train(tiny_model("llama"), BatchStream(_encoded(4), 2, 0), **args)


def test_train_needs_trainable_parameters():
    model = tiny_model("llama")
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, BatchStream(_encoded(4), 2, 0), steps=1, progress=False)


def test_non_finite_loss_stops_before_that_step_is_saved(tmp_path, monkeypatch):
    real = fxsparse.app.train.accumulate_gradients
    calls = {"n": 0}

    def nan_at_step_two(model, micro_batches):
        calls["n"] += 1
        loss, total = real(model, micro_batches)
        return (float("nan") if calls["n"] == 2 else loss), total

    monkeypatch.setattr(fxsparse.app.train, "accumulate_gradients", nan_at_step_two)
    model = tiny_model("llama")
    stream = BatchStream(_encoded(8), batch_size=4, pad_id=TOK.pad_token_id)
    with pytest.raises(FloatingPointError, match=r"nan at step 2") as info:
        train(model, stream, steps=3, lr=1e-3, checkpoint_dir=tmp_path, checkpoint_every=1, progress=False)
    assert isinstance(info.value, ValueError) and isinstance(info.value, NonFiniteLossError)  # CLI: clean exit 2
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert saved["step"] == 1 and len(saved["metrics"]["history"]) == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_write_text_atomic_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_text_atomic(path, "old")
    assert path.read_text() == "old"

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(fxsparse.app.loop.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(path, "new")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    monkeypatch.undo()
    write_text_atomic(path, "new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_check_out_dir_needs_resume_or_overwrite_over_an_earlier_run(tmp_path):
    assert check_out_dir(tmp_path / "fresh", ["last.pt"], resume=False, overwrite=False) is False
    (tmp_path / "last.pt").write_text("x")
    with pytest.raises(ValueError, match=r"already holds.*--resume.*--overwrite") as info:
        check_out_dir(tmp_path, ["last.pt", "metrics.json"], resume=False, overwrite=False)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(ValueError, match="contradict"):
        check_out_dir(tmp_path, ["last.pt"], resume=True, overwrite=True)
    assert check_out_dir(tmp_path, ["last.pt"], resume=True, overwrite=False) is True
    assert (tmp_path / "last.pt").exists()
    (tmp_path / "last.pt.sha256").write_text("{}")
    assert check_out_dir(tmp_path, ["last.pt"], resume=False, overwrite=True) is True
    assert not (tmp_path / "last.pt").exists()  # a crash of the new run cannot leave the old one to resume
    assert not (tmp_path / "last.pt.sha256").exists()
