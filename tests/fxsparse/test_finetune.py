"""The ``fxsparse finetune`` command end to end on a tiny model, its outputs, resume and option checks."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch

import fxsparse
import fxsparse.app.finetune
from fxsparse.app.finetune import DEMO_SETTINGS, add_parser, parse_ratios, run
from fxsparse.models import tiny_model


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    return parser.parse_args(argv)


def _finetune(tmp_path, *extra: str) -> dict:
    args = _parse(["finetune", "--model", "tiny-llama", "--task", "add", "--ratios", "o=0.5,down=0.25,v=0.5",
                   "--steps", "4", "--batch-size", "4", "--warmup", "1", "--lr", "3e-3", "--train-n", "64",
                   "--eval-n", "6", "--no-progress", "--out", str(tmp_path), *extra])
    return args.func(args)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """One uninterrupted 4-step run, shared by the tests below (each CLI run transforms and evaluates)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("straight")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        metrics = _finetune(out)
    return out, metrics, printed.getvalue()


def test_finetune_tiny_llama_end_to_end(straight_run):
    tmp_path, metrics, printed = straight_run
    assert "exact match before" in printed and "exact match after" in printed
    assert "trainable parameters:" in printed

    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["steps"] == 4 and len(on_disk["losses"]) == 4
    assert on_disk["heldout_examples"] == 6 and 0 <= on_disk["exact_match_after"] <= 1
    assert on_disk["trainable_params"] == metrics["trainable_params"] > 0
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"

    # the adapter re-creates the trained model on a fresh base: same logits as a model trained in-process
    trained = fxsparse.transform(tiny_model("llama"), recipe="s2ft", ratios=parse_ratios("o=0.5,down=0.25,v=0.5"),
                                 select="random", seed=0)
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["trainable"]
    trained.load_state_dict(saved, strict=False)
    loaded = fxsparse.load_adapter(tiny_model("llama"), tmp_path / "adapter")
    x = torch.randint(0, 80, (2, 11), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded(x).logits, trained(x).logits)
    assert not torch.allclose(loaded(x).logits, tiny_model("llama")(x).logits)


class _Killed(Exception):
    pass


def test_finetune_resume_after_a_crash_reaches_the_same_result(straight_run, tmp_path, monkeypatch):
    straight_dir, straight, _ = straight_run

    import fxsparse.app.data

    real_next = fxsparse.app.data.BatchStream.__next__
    calls = {"n": 0}

    def crash_after_three(self):
        calls["n"] += 1
        if calls["n"] > 3:  # dies inside step 4, after the checkpoint at step 2
            raise _Killed
        return real_next(self)

    monkeypatch.setattr(fxsparse.app.data.BatchStream, "__next__", crash_after_three)
    with pytest.raises(_Killed):
        _finetune(tmp_path / "b", "--checkpoint-every", "2")
    assert torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)["step"] == 2
    assert not (tmp_path / "b" / "metrics.json").exists()
    monkeypatch.setattr(fxsparse.app.data.BatchStream, "__next__", real_next)

    resumed = _finetune(tmp_path / "b", "--checkpoint-every", "2", "--resume")
    assert resumed["resumed_from"] == 2 and resumed["steps"] == 4
    assert resumed["losses"] == straight["losses"]
    a = fxsparse.load_adapter(tiny_model("llama"), straight_dir / "adapter")
    b = fxsparse.load_adapter(tiny_model("llama"), tmp_path / "b" / "adapter")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name


def test_finetune_full_recipe_and_jsonl_data(tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [json.dumps({"prompt": f"{i} + 1 =", "response": str(i + 1)}) for i in range(20)]
    data.write_text("\n".join(rows) + "\n")
    args = _parse(["finetune", "--model", "tiny-llama", "--data", str(data), "--recipe", "full", "--steps", "2",
                   "--batch-size", "4", "--eval-n", "5", "--no-progress", "--out", str(tmp_path / "out")])
    metrics = run(args)
    assert metrics["train_examples"] == 15 and metrics["heldout_examples"] == 5
    assert metrics["trainable_params"] == metrics["total_params"]
    assert (tmp_path / "out" / "model" / "config.json").is_file()


def test_parse_ratios():
    assert parse_ratios("o=0.05, down=0.02,") == {"o": 0.05, "down": 0.02}
    with pytest.raises(ValueError, match="'x=0.1'"):
        parse_ratios("x=0.1")
    with pytest.raises(ValueError, match="'o=abc'"):
        parse_ratios("o=abc")
    with pytest.raises(ValueError, match="'o=1.5'"):
        parse_ratios("o=1.5")
    with pytest.raises(ValueError, match="names no projection"):
        parse_ratios(" , ")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--lr", "0"], "--lr must be > 0, got 0.0"),
        (["--task", "nope"], "unknown task 'nope'"),
        (["--resume"], "no checkpoint"),
        (["--ratios", "o=2"], "'o=2'"),
        (["--layers", "3-1"], "'3-1'"),
    ],
)
def test_finetune_rejects_bad_options(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        _finetune(tmp_path, *extra)


def test_demo_parser_defaults_are_the_documented_demo():
    # The README and the DEMO_SETTINGS comment document these exact settings (12 steps on two-digit addition,
    # blocks 10-29): pin them as literals, and check that `finetune` does not inherit the demo's shortcuts.
    demo = _parse(["demo"])
    assert (demo.model, demo.recipe, demo.steps, demo.layers) == ("smollm2", "s2ft", 12, "10-29")
    assert demo.task is None and DEMO_SETTINGS["task"] == "add"  # run_demo fills the task in
    assert parse_ratios(demo.ratios) == {"o": 0.1, "down": 0.1, "v": 0.1, "up": 0.1}
    finetune = _parse(["finetune"])
    assert finetune.layers is None and finetune.steps == 100
    assert parse_ratios(finetune.ratios) == {"o": 0.052, "down": 0.02}


def test_parse_layers_and_layers_option_limits_trainable_blocks():
    from fxsparse.app.finetune import _transform, parse_layers

    assert parse_layers("3, 0-1,1") == [0, 1, 3]
    for bad in ("a", "2-1", "-1"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            parse_layers(bad)
    args = _parse(["finetune", "--model", "tiny-llama", "--ratios", "o=0.5,down=0.5", "--layers", "1"])
    model, _ = _transform(tiny_model("llama"), None, [], args)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("model.layers.1.") for n in names)


def test_finetune_refuses_an_earlier_run_without_resume_or_overwrite(straight_run):
    out, straight, _ = straight_run
    before = (out / "metrics.json").read_text()
    with pytest.raises(ValueError, match=r"already holds.*--resume.*--overwrite") as info:
        _finetune(out)
    assert str(out) in str(info.value)
    with pytest.raises(ValueError, match=r"--resume and --overwrite"):
        _finetune(out, "--resume", "--overwrite")
    assert (out / "metrics.json").read_text() == before  # refused before touching anything


def test_finetune_overwrite_starts_again_from_step_zero(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "metrics.json").write_text('{"stale": true}')
    metrics = _finetune(tmp_path, "--overwrite", "--steps", "2")
    assert metrics["resumed_from"] == 0 and metrics["steps"] == 2
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".part") == []


def test_demo_rerun_replaces_its_own_output_with_a_notice(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fxsparse.app.finetune, "run", lambda args: {"overwrite": args.overwrite})
    argv = ["demo", "--out", str(tmp_path)]
    assert _parse(argv).func(_parse(argv)) == {"overwrite": False}  # nothing there yet: no notice
    assert "replacing" not in capsys.readouterr().out
    (tmp_path / "metrics.json").write_text("{}")
    assert _parse(argv).func(_parse(argv)) == {"overwrite": True}
    assert f"replacing the earlier demo run in {tmp_path}" in capsys.readouterr().out
    assert _parse([*argv, "--resume"]).func(_parse([*argv, "--resume"])) == {"overwrite": False}
