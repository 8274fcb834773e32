"""The command line's polish (issue 11 point 4) and `fxsparse export`: every default in --help, clear fixes for
bad values before any model loads, warnings for odd settings, the demo's closing summary, bench's --out, tune on
machines without CUDA, SLTrain on trained weights, and export / export-lora wiring."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pytest

from fxsparse.app import cli
from fxsparse.app.cli import HelpFormatter, build_parser, main

SUBCOMMANDS = ("inspect", "merge", "export", "bench", "tune", "finetune", "demo", "pretrain")


class _Loaded(Exception):
    """Raised by the stand-in loaders: reaching one means validation came too late."""


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FXSPARSE_CACHE_DIR", str(tmp_path / "cache"))


def _subparsers(parser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


# ---- --help shows every default ---------------------------------------------------------------------------


def test_help_of_every_subcommand_shows_each_default_once():
    parsers = _subparsers(build_parser())
    assert set(SUBCOMMANDS) <= set(parsers)
    checked = 0
    for name, parser in parsers.items():
        formatter = HelpFormatter(prog=name)
        assert isinstance(parser._get_formatter(), HelpFormatter), name
        for action in parser._actions:
            if not HelpFormatter._shows_default(action):
                continue
            text = formatter._get_help_string(action)
            where = f"fxsparse {name} {action.option_strings[0]}: {text!r}"
            assert text.count("(default") == 1, where
            if action.default is not None:
                first = action.default[0] if isinstance(action.default, (list, tuple)) else action.default
                assert str(first) in text, where
            checked += 1
    assert checked > 60


def test_help_text_renders_defaults_of_options_without_help(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for shown in ("--lr LR (default: 0.003)", "--seq-len SEQ_LEN (default: 256)", "(default: 0.03)",
                  "--config CONFIG JSON file", "(default: not set)", "(default: debian-docs where installed"):
        assert shown in out, shown
    assert "(default 60m)" not in out and "--preset PRESET model size: 9m" in out


def test_finetune_and_demo_layers_help_states_their_own_default():
    parsers = _subparsers(build_parser())
    formatter = HelpFormatter(prog="x")

    def layers_help(name):
        action = next(a for a in parsers[name]._actions if "--layers" in a.option_strings)
        return formatter._get_help_string(action)

    assert "(default: all blocks)" in layers_help("finetune")
    assert "(default: 10-29)" in layers_help("demo")


# ---- values validated before the model loads ---------------------------------------------------------------


@pytest.fixture
def no_loading(monkeypatch):
    """Every way the commands load a model or tokenizer raises _Loaded."""
    import fxsparse.app.finetune as finetune
    import fxsparse.app.models as models
    import fxsparse.app.pretrain as pretrain
    import fxsparse.tune as tune

    monkeypatch.setattr(tune, "_nothing_to_tune", lambda: None)  # as on a CUDA machine: tune would load

    def loaded(*args, **kwargs):
        raise _Loaded

    for module, name in ((finetune, "_load"), (models, "load_model"), (models, "load_default_model"),
                         (pretrain, "_load_tokenizer"), (pretrain, "build_model"), (tune, "_load")):
        monkeypatch.setattr(module, name, loaded)
    from fxsparse.models import tiny_config

    tiny_config("llama")  # transformers' lazy imports once here, so the timings below are the checks alone


def _jsonl(path: Path, count: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "response": str(i + 1)}) + "\n"
                            for i in range(count)))
    return path


BAD_VALUES = [
    (["finetune", "--model", "tiny-llama", "--ratios", "o=2"], "bad ratio 'o=2'"),
    (["finetune", "--model", "tiny-llama", "--ratios", "attn=0.1"], "expected ROLE=FRACTION"),
    (["finetune", "--model", "tiny-llama", "--layers", "5"], "tiny-llama has 2 blocks, numbered 0-1"),
    (["finetune", "--model", "smollm2", "--layers", "20-30"], "smollm2 has 30 blocks"),
    (["finetune", "--model", "tiny-llama", "--layers", "3-1"], "bad layer range '3-1'"),
    (["demo", "--model", "tiny-llama", "--layers", "0-1", "--ratios", "down=-0.1"], "bad ratio 'down=-0.1'"),
    (["demo", "--model", "tiny-llama"], "--layers 10-29 names block 29, but tiny-llama has 2 blocks"),
    (["pretrain", "--preset", "9m", "--sparsity", "1.5"], "--sparsity is the density"),
    (["pretrain", "--preset", "9m", "--rank", "0"], "--rank must be at least 1"),
    (["pretrain", "--preset", "9m", "--rank", "128"], "--rank 128 must be below 128"),
    (["pretrain", "--preset", "9m", "--support", "block", "--block-size", "256"], "--block-size 128 or less"),
    (["pretrain", "--preset", "9m", "--block-size", "0"], "--block-size must be at least 1"),
    (["pretrain", "--preset", "9m", "--alpha", "-1"], "--alpha must be a positive"),
    (["pretrain", "--preset", "9m", "--val-fraction", "1"], "--val-fraction must be in (0, 1)"),
    (["tune", "--model", "smollm2", "--recipe", "sltrain", "--rank", "0"], "rank=0 must be a positive int"),
    (["tune", "--model", "smollm2", "--recipe", "sltrain", "--sparsity", "2"], "sparsity=2.0"),
    (["tune", "--model", "smollm2", "--ratios", "o=0.1,down=3"], "bad ratio 'down=3'"),
    (["tune", "--model", "smollm2", "--tokens", "0"], "--tokens must be positive"),
]


@pytest.mark.parametrize("argv,message", BAD_VALUES, ids=[" ".join(a[0:1] + a[-2:]) for a, _ in BAD_VALUES])
def test_bad_values_fail_fast_before_any_model_loads(argv, message, no_loading, tmp_path, capsys):
    start = time.process_time()
    out = [] if argv[0] == "tune" else ["--out", str(tmp_path / "run")]
    assert main([*argv, *out]) == 2  # never _Loaded
    elapsed = time.process_time() - start
    err = capsys.readouterr().err
    assert message in err, err
    assert elapsed < 1.0, f"{elapsed:.2f} CPU-s to refuse {argv}"
    assert not (tmp_path / "run").exists()


def test_eval_n_larger_than_the_data_file_says_how_to_fix_it(no_loading, tmp_path, capsys):
    data = _jsonl(tmp_path / "pairs.jsonl", 30)
    assert main(["finetune", "--model", "tiny-llama", "--data", str(data), "--eval-n", "40",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--eval-n 40 asks for 40 held-out examples" in err and "has only 30" in err
    assert "pass --eval-n 3 (10% held out for exact match) or --eval-n 0" in err
    assert main(["finetune", "--model", "tiny-llama", "--data", str(data), "--eval-n", "30",
                 "--out", str(tmp_path / "run")]) == 2
    assert "holds out all 30 examples" in capsys.readouterr().err
    with pytest.raises(_Loaded):  # a fitting --eval-n passes the checks and goes on to load the model
        main(["finetune", "--model", "tiny-llama", "--data", str(data), "--eval-n", "3", "--out",
              str(tmp_path / "run")])


def test_warmup_longer_than_the_run_is_warned_about(no_loading, tmp_path, capsys):
    with pytest.raises(_Loaded):
        main(["finetune", "--model", "tiny-llama", "--steps", "4", "--warmup", "10", "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert "warning: the warm-up (--warmup 10) is longer than the run (--steps 4)" in err
    assert "pass --warmup 0 or fewer" in err
    with pytest.raises(_Loaded):
        main(["finetune", "--model", "tiny-llama", "--steps", "40", "--warmup", "10", "--out", str(tmp_path / "b")])
    assert "warning" not in capsys.readouterr().err


# ---- SLTrain on trained weights ------------------------------------------------------------------------------


def test_finetune_with_a_pretraining_recipe_explains_the_reinitialisation(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--model", "smollm2", "--recipe", "sltrain"])
    assert exit_info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "re-initialises every projection" in err and "throw away the model's trained weights" in err
    assert "fxsparse pretrain --recipe sltrain" in err


def test_tune_says_sltrain_replaces_trained_weights(monkeypatch, capsys):
    import fxsparse.tune as tune

    monkeypatch.setattr(tune, "_nothing_to_tune", lambda: None)
    monkeypatch.setattr(tune, "_load", lambda args: (_ for _ in ()).throw(_Loaded()))
    with pytest.raises(_Loaded):
        main(["tune", "--model", "smollm2", "--recipe", "sltrain"])
    assert "sltrain re-initialises every attention and FFN projection of smollm2" in capsys.readouterr().out
    for argv in (["--model", "9m", "--recipe", "sltrain"], ["--model", "tiny-llama", "--recipe", "lowrank"],
                 ["--model", "smollm2", "--recipe", "s2ft"]):
        with pytest.raises(_Loaded):
            main(["tune", *argv])
        assert "re-initialises" not in capsys.readouterr().out, argv


def test_tune_without_cuda_says_it_only_tunes_on_cuda(monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine tunes for real")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("FXSPARSE_KERNELS", raising=False)
    assert main(["tune", "--model", "tiny-llama"]) == 0
    assert "no CUDA device here" in capsys.readouterr().out
    help_line = _subparsers_help()
    assert "CUDA only" in help_line


def _subparsers_help() -> str:
    parser = build_parser()
    return " ".join(parser.format_help().split())


# ---- bench -------------------------------------------------------------------------------------------------


def test_bench_says_where_it_appends_and_passes_out(monkeypatch, tmp_path, capsys):
    import runpy

    seen = {}

    def fake_run_path(path, run_name):
        seen.update(path=Path(path), argv=list(sys.argv), run_name=run_name)

    monkeypatch.setattr(runpy, "run_path", fake_run_path)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert main(["bench", "s2ft", "--allow-dirty"]) == 0
    assert seen["path"].is_file() and seen["path"].name == "bench_s2ft.py"
    assert seen["argv"][1:] == ["--allow-dirty"]
    assert "appends its rows to benchmarks/results/ s2ft_vs_lora.csv" in capsys.readouterr().out
    assert main(["bench", "--out", str(tmp_path), "sltrain", "--repeats", "3"]) == 0
    assert seen["path"].name == "bench_sltrain_block.py"
    assert seen["argv"][1:] == ["--out", str(tmp_path), "--repeats", "3"]
    assert f"appends its rows to {tmp_path} sltrain_block.csv" in capsys.readouterr().out
    assert main(["bench", "sltrain", "--tiny"]) == 0
    assert "writes no results file" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "benchmarks/results/" in help_text and "--out OUT" in help_text


def test_both_bench_scripts_take_out():
    root = Path(cli.__file__).resolve().parents[2] / "benchmarks"
    for script in ("bench_s2ft.py", "bench_sltrain_block.py"):
        assert 'add_argument("--out"' in (root / script).read_text(), script


# ---- the demo's closing summary ---------------------------------------------------------------------------


def test_demo_lists_every_file_it_wrote_and_what_next(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--model", "tiny-llama", "--steps", "2", "--train-n", "8", "--eval-n", "2",
                 "--batch-size", "2", "--eval-batch-size", "2", "--layers", "0-1", "--ratios", "o=0.5,down=0.5",
                 "--warmup", "0", "--seq-len", "48", "--no-progress", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    summary = text[text.index("the demo wrote"):]
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert f"the demo wrote {len(written)} files under {out}:" in summary
    listed = [line.split("  (")[0].strip() for line in summary.splitlines()[1:] if line.startswith("  ")
              and "(" in line and not line.strip().startswith(("fxsparse", "python"))]
    assert listed == written
    assert {"metrics.json", "loss.png"} <= set(written) and any(w.startswith("adapter") for w in written)
    assert f"fxsparse merge --model tiny-llama --adapter {out / 'adapter'}" in summary
    assert "fxsparse finetune --model tiny-llama --data pairs.jsonl" in summary


# ---- export and export-lora --------------------------------------------------------------------------------


def test_export_refuses_a_missing_checkpoint_and_a_full_out(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "hf")]) == 2
    assert "checkpoint.pt that `fxsparse pretrain` wrote" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"x")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "hf" / "keep.txt").read_text() == "mine"


def test_export_writes_a_folder_transformers_loads(tmp_path, capsys):
    if cli._find_export_hf() is None:
        pytest.skip("export_hf(checkpoint_path, out_dir) is not provided yet by the training-loop modules "
                    f"({', '.join(cli._EXPORT_HF_MODULES)})")
    import torch
    from transformers import AutoModelForCausalLM

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"d{i}.txt").write_text(f"document {i}: " + "sparse plus low rank " * 60)
    run = tmp_path / "run"
    assert main(["pretrain", "--preset", "9m", "--steps", "2", "--tokenizer", "bytes", "--data", str(docs),
                 "--seq-len", "32", "--batch-size", "2", "--eval-batches", "1", "--no-progress",
                 "--out", str(run)]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert f"load it with: AutoModelForCausalLM.from_pretrained('{tmp_path / 'hf'}')" in out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.config.hidden_size == 128 and model.config.num_hidden_layers == 4
    assert model.config.vocab_size == 257
    with torch.no_grad():
        logits = model(torch.randint(0, 257, (1, 16))).logits
    assert logits.shape == (1, 16, 257) and torch.isfinite(logits).all()


def test_export_lora_is_a_subcommand_when_its_module_has_one():
    import importlib

    module = importlib.import_module("fxsparse.export")
    assert ("export-lora" in _subparsers(build_parser())) == callable(getattr(module, "add_parser", None))


def test_cli_works_without_a_delegated_module(monkeypatch):
    monkeypatch.setitem(cli._DELEGATED, "ghost", "fxsparse.no_such_module")
    parsers = _subparsers(build_parser())
    assert "ghost" not in parsers and {"inspect", "pretrain"} <= set(parsers)
