"""The one training loop: resume refuses another model or plan by name, applies a new --lr, pretrain's
summary and Hugging Face export, and inputs that do not fit the model."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

import fxsparse
from fxsparse.app.checkpoint import load_checkpoint
from fxsparse.app.data import BatchStream, CharTokenizer, Encoded, encode_examples, task_splits
from fxsparse.app.loop import lr_factor, run_loop
from fxsparse.app.train import CHECKPOINT_NAME, train
from fxsparse.models import tiny_model

TOK = CharTokenizer()


def _stream(seed: int = 0) -> BatchStream:
    return BatchStream(encode_examples(TOK, task_splits("add", 8, 0, seed=0)[0]), 4, TOK.pad_token_id, seed=seed)


def _s2ft(seed: int = 0, arch: str = "llama"):
    return fxsparse.transform(tiny_model(arch), recipe="s2ft", ratios={"o": 0.5, "down": 0.25}, seed=seed)


def test_checkpoint_records_model_identity_plan_and_run_config(tmp_path):
    model = _s2ft()
    train(model, _stream(), steps=1, lr=1e-3, checkpoint_dir=tmp_path, progress=False, model_name="tiny-llama",
          config={"ratios": {"o": 0.5, "down": 0.25}})
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    identity = state["identity"]
    assert identity["name"] == "tiny-llama" and identity["class"].endswith("LlamaForCausalLM")
    assert identity["recipe"] == "s2ft" and identity["plan"] == fxsparse.recipes.s2ft.s2ft_state(model).plan.to_dict()
    assert state["config"] == {"grad_accum": 1, "ratios": {"o": 0.5, "down": 0.25}}
    assert state["loop"]["optimizer"]["lr"] == 1e-3 and state["loop"]["schedule"]["steps"] == 1


def test_resume_refuses_another_plan_model_or_setting_by_name(tmp_path):
    train(_s2ft(seed=0), _stream(), steps=1, lr=1e-3, checkpoint_dir=tmp_path, progress=False,
          config={"select": "random"}, flags={"plan": "--select/--seed"})
    kwargs = dict(steps=2, lr=1e-3, checkpoint_dir=tmp_path, resume=True, progress=False)
    # same shapes and names, other heads/channels: loading would put trained blocks into other units
    with pytest.raises(ValueError, match=r"S2FT selection.*--select/--seed.*--overwrite"):
        train(_s2ft(seed=1), _stream(), config={"select": "random"}, flags={"plan": "--select/--seed"}, **kwargs)
    with pytest.raises(ValueError, match=r"--select is 'weight' in this run but 'random' in checkpoint"):
        train(_s2ft(seed=0), _stream(), config={"select": "weight"}, flags={"select": "--select"}, **kwargs)
    with pytest.raises(ValueError, match=r"model class differs") as info:
        train(_s2ft(arch="qwen3"), _stream(), config={"select": "random"}, flags={"model": "--model"}, **kwargs)
    assert "--model" in str(info.value)
    with pytest.raises(ValueError, match=r"--grad-accum is 2 in this run but 1"):
        train(_s2ft(seed=0), _stream(), grad_accum=2, config={"select": "random"}, **kwargs)
    train(_s2ft(seed=0), _stream(), config={"select": "random"}, **kwargs)  # the same settings resume


def test_resume_with_another_lr_uses_it_and_says_so(tmp_path, capsys):
    train(tiny_model("llama"), _stream(), steps=2, lr=1e-3, warmup_steps=1, checkpoint_dir=tmp_path, progress=False)
    capsys.readouterr()
    result = train(tiny_model("llama"), _stream(), steps=4, lr=5e-3, warmup_steps=1, checkpoint_dir=tmp_path,
                   resume=True, progress=False, flags={"lr": "--lr"})
    printed = capsys.readouterr().out
    assert "--lr is 0.005 in this run, 0.001 in the checkpoint" in printed
    assert "--steps" not in printed and "steps is 4 in this run, 2" in printed  # a longer schedule: said too
    expected = [1e-3 * lr_factor(s, 2, 1, "cosine") for s in range(2)] + [5e-3 * lr_factor(s, 4, 1, "cosine")
                                                                         for s in (2, 3)]
    assert result.lrs == pytest.approx(expected, rel=1e-12)
    assert len(result.notes) == 2
    saved = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert saved["loop"]["optimizer"]["lr"] == 5e-3 and saved["metrics"]["notes"] == result.notes


def test_finetune_resume_names_the_changed_option_and_records_a_new_lr(tmp_path, capsys):
    from fxsparse.app.finetune import add_parser

    def finetune(*extra: str) -> dict:
        parser = argparse.ArgumentParser()
        add_parser(parser.add_subparsers(dest="command"))
        args = parser.parse_args(["finetune", "--model", "tiny-llama", "--task", "add", "--ratios", "o=0.5,down=0.25",
                                  "--steps", "2", "--batch-size", "4", "--warmup", "0", "--train-n", "16",
                                  "--eval-n", "0", "--no-progress", "--out", str(tmp_path), *extra])
        return args.func(args)

    finetune("--lr", "1e-3")
    assert "train longer: fxsparse finetune --model tiny-llama" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"--resume: --select is 'weight' in this run but 'random'"):
        finetune("--lr", "1e-3", "--select", "weight", "--resume")
    with pytest.raises(ValueError, match=r"--resume: --model.*'tiny-qwen3'.*'tiny-llama'"):
        finetune("--lr", "1e-3", "--model", "tiny-qwen3", "--resume")
    with pytest.raises(ValueError, match=r"--resume: --ratios"):
        finetune("--lr", "1e-3", "--ratios", "o=0.25,down=0.25", "--resume")
    metrics = finetune("--lr", "2e-3", "--steps", "3", "--resume")
    assert metrics["lr"] == 2e-3 and metrics["lrs"][2] == pytest.approx(2e-3 * lr_factor(2, 3, 0, "cosine"))
    assert metrics["lrs"][:2] == pytest.approx([1e-3 * lr_factor(s, 2, 0, "cosine") for s in range(2)])
    assert any("--lr is 0.002" in note for note in json.loads((tmp_path / "metrics.json").read_text())["resume_notes"])


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(1)
    words = "the model trains a sparse plus low rank weight on text".split()
    for i in range(6):
        (folder / f"d{i}.txt").write_text(" ".join(rng.choice(words, size=120)) + "\n")
    config = folder / "tiny.json"
    config.write_text(json.dumps({"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                                  "num_attention_heads": 4}))
    return folder, config


def test_resume_from_a_corrupt_checkpoint_is_a_clean_cli_error(tiny_corpus, tmp_path, capsys, monkeypatch):
    from fxsparse.app.cli import main

    monkeypatch.setenv("FXSPARSE_CACHE_DIR", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    docs, config = tiny_corpus
    argv = ["pretrain", "--config", str(config), "--recipe", "dense", "--data", str(docs), "--tokenizer", "bytes",
            "--seq-len", "16", "--batch-size", "2", "--steps", "2", "--eval-batches", "1", "--val-fraction", "0.2",
            "--threads", "1", "--no-progress", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    assert main([*argv, "--steps", "3", "--resume"]) == 2
    torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert f"checkpoint {str(checkpoint)!r} is corrupt" in err and "--overwrite" in err and "Traceback" not in err


def test_run_loop_checks_its_arguments():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"stop_at must be in \[1, steps=3\], got 4"):
        run_loop(model, lambda: (0.0, 1), steps=3, lr=1e-3, stop_at=4, progress=False)


@pytest.mark.parametrize("recipe", ["sltrain", "lowrank", "dense"])
def test_pretrain_summary_and_save_hf_reload_to_the_same_logits(tiny_corpus, tmp_path, capsys, monkeypatch, recipe):
    from transformers import AutoModelForCausalLM

    from fxsparse.app.pretrain import apply_recipe, build_model, export_hf, parse_args, preset_from_config, run

    monkeypatch.setenv("FXSPARSE_CACHE_DIR", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    docs, config = tiny_corpus
    out, hf = tmp_path / "run", tmp_path / "hf"
    args = parse_args(["--config", str(config), "--data", str(docs), "--tokenizer", "bytes", "--recipe", recipe,
                       "--rank", "4", "--sparsity", "0.1", "--seq-len", "16", "--batch-size", "2", "--steps", "3",
                       "--eval-every", "3", "--eval-batches", "1", "--val-fraction", "0.2", "--threads", "1",
                       "--no-progress", "--out", str(out), "--save-hf", str(hf)])
    metrics = run(args)
    torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert f"perplexity {metrics['final_val_ppl']:.2f}" in printed and f"{metrics['tokens_seen']:,} tokens" in printed
    assert str(out / "checkpoint.pt") in printed and str(hf) in printed
    assert "--steps 6" in printed and printed.rstrip().endswith("--resume")

    state = load_checkpoint(out / "checkpoint.pt")
    trained = apply_recipe(build_model(preset_from_config(config), metrics["config"]["vocab_size"], 16, 0),
                           recipe, state["config"]["recipe_options"])
    trained.load_state_dict(state["model"])
    reloaded = AutoModelForCausalLM.from_pretrained(hf)
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    assert not any("sltrain" in type(m).__name__.lower() for m in reloaded.modules())
    ids = torch.randint(0, metrics["config"]["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = trained.eval()(ids).logits, reloaded.eval()(ids).logits
    torch.testing.assert_close(got, expected, rtol=1.3e-6, atol=2e-5)
    assert export_hf(out / "checkpoint.pt", tmp_path / "again") == tmp_path / "again"


def test_export_hf_refuses_a_finetune_checkpoint(tmp_path):
    from fxsparse.app.pretrain import export_hf

    train(_s2ft(), _stream(), steps=1, lr=1e-3, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="not an fxsparse pretrain checkpoint"):
        export_hf(tmp_path / CHECKPOINT_NAME, tmp_path / "hf")


def test_token_ids_beyond_the_vocabulary_and_sequences_beyond_the_positions_are_named(tmp_path):
    from fxsparse.app.finetune import _check_fits_model, add_parser

    args = argparse.Namespace(model="tiny-llama", seq_len=256)
    model = tiny_model("llama")  # vocabulary 96, 64 positions
    with pytest.raises(ValueError, match=r"token id 96, outside the model's vocabulary of 96 \(ids 0-95\)"):
        _check_fits_model(model, [Encoded((1, 2), (3,)), Encoded((96,), (4,))], args)
    with pytest.raises(ValueError, match=r"--seq-len 256 lets sequences of 70 tokens through.*64 positions.*"
                                         r"--seq-len 64 or less"):
        _check_fits_model(model, [Encoded(tuple(range(5, 65)), tuple(range(5, 15)))], args)
    _check_fits_model(model, [Encoded(tuple(range(5, 60)), (95,))], args)

    # end to end: GPT-2's learned positions would raise a raw IndexError in the first forward
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"prompt": "1 + 2 = " * 12, "response": "3"}) + "\n" for _ in range(8)))
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    cli = parser.parse_args(["finetune", "--model", "tiny-gpt2", "--data", str(data), "--eval-n", "2", "--steps", "1",
                             "--seq-len", "200", "--no-progress", "--out", str(tmp_path / "out")])
    with pytest.raises(ValueError, match=r"--seq-len 200 .* 'tiny-gpt2' has 64 positions"):
        cli.func(cli)
    assert not (tmp_path / "out" / "checkpoints").exists()  # refused before anything trained
