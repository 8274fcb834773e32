"""The fxsparse command line: inspect (table and JSON), errors, merge of an adapter."""

import json

import pytest
import torch

import fxsparse
from fxsparse.app.cli import main
from fxsparse.models import tiny_model


def test_inspect_json(capsys):
    assert main(["inspect", "--model", "tiny-qwen3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [b["attention"]["head_dim"] for b in data["blocks"]] == [20, 20]
    assert data["blocks"][1]["ffn"]["down"] == "model.layers.1.mlp.down_proj"


def test_inspect_table(capsys):
    assert main(["inspect", "--model", "tiny-phi3"]) == 0
    out = capsys.readouterr().out
    assert "qkv_proj (fused)" in out and "gate_up_proj -> down_proj (fused)" in out
    assert "unrecognized linears (left dense): 1\n  lm_head: " in out


def test_inspect_prints_what_it_left_dense_and_why(capsys):
    from fxsparse.app.cli import format_structure
    from fxsparse.structure import Structure

    structure = Structure(blocks=[], unrecognized=["model.layers.0.self_attn.q_proj", "lm_head"],
                          reasons={"model.layers.0.self_attn.q_proj": "a per-head gain multiplies q"})
    text = format_structure(structure)
    assert "  model.layers.0.self_attn.q_proj: a per-head gain multiplies q" in text
    assert "  lm_head: not part of an attention or FFN pattern" in text


def test_inspect_prints_heads_and_channels_kept_in_place():
    from fxsparse.app.cli import format_structure
    from fxsparse.structure import FFN, Attention, Block, Projection, Structure

    p = Projection
    attention = Attention(p("a.q"), p("a.k"), p("a.v"), p("a.o"), 4, 2, 8, fixed_order="sinks per head")
    ffn = FFN(p("f.up"), p("f.gate"), p("f.down"), 16, "silu", fixed_order="a norm over every channel")
    text = format_structure(Structure(blocks=[Block(0, attention, ffn), Block(1, attention, None)]))
    assert "attention heads kept in place in 2 block(s)" in text and "  block 1: sinks per head" in text
    assert "FFN channels kept in place in 1 block(s)" in text and "  block 0: a norm over every channel" in text


def test_unknown_model_is_a_clean_error(capsys):
    assert main(["inspect", "--model", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err


def test_merge_command_writes_a_plain_model(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    trained = fxsparse.transform(tiny_model("llama"), "s2ft", ratios={"o": 0.5, "down": 0.2})
    with torch.no_grad():
        for p in fxsparse.trainable_parameters(trained):
            p.add_(1.0)
    fxsparse.save_adapter(trained, tmp_path / "adapter")
    assert main(["merge", "--model", "tiny-llama", "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    x = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        assert torch.allclose(merged(x).logits, trained(x).logits, atol=1e-5)


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("inspect", "finetune", "demo", "pretrain", "merge", "bench", "tune"):
        assert command in out
