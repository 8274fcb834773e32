"""fxsparse.capture: plain nn.Module decoders with tensor or tuple examples, and the fallbacks capture retries with
(which one worked is on ``Captured.fallback`` and in the capture_graph pass's info)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse
from fxsparse.capture import ATTEMPTS, capture, module_path
from fxsparse.models import tiny_model
from fxsparse.passes.capture_graph import capture_graph


class FusedQKVDecoder(nn.Module):
    """nanoGPT style: one c_attn linear for q, k and v, F.scaled_dot_product_attention(is_causal=True)."""

    def __init__(self, vocab=50, dim=24, heads=3, layers=2, ffn=40):
        super().__init__()
        self.heads = heads
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(64, dim)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            block = nn.Module()
            block.ln1, block.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            block.c_attn, block.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            block.c_fc, block.mlp_proj = nn.Linear(dim, ffn), nn.Linear(ffn, dim)
            self.blocks.append(block)
        self.ln_f, self.lm_head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        b, t = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.blocks:
            q, k, v = block.c_attn(block.ln1(x)).split(x.shape[-1], dim=2)
            q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + block.c_proj(y.transpose(1, 2).reshape(b, t, -1))
            x = x + block.mlp_proj(F.gelu(block.c_fc(block.ln2(x))))
        return self.lm_head(self.ln_f(x))


class WrittenOutGQADecoder(nn.Module):
    """gpt-fast style GQA with repeat_interleave and written-out attention; takes (ids, scale) as a tuple."""

    def __init__(self, vocab=50, dim=24, heads=4, kv_heads=2, layers=2, ffn=36):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.Module()
            layer.wq, layer.wo = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
            layer.wk = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
            layer.wv = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
            layer.w1, layer.w3 = nn.Linear(dim, ffn, bias=False), nn.Linear(dim, ffn, bias=False)
            layer.w2 = nn.Linear(ffn, dim, bias=False)
            self.layers.append(layer)
        self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids, scale):
        b, t = ids.shape
        x = self.embed(ids) * scale
        mask = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()
        for layer in self.layers:
            q = layer.wq(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            k = layer.wk(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = layer.wv(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            x = x + layer.wo((weights @ v).transpose(1, 2).reshape(b, t, -1))
            x = x + layer.w2(F.silu(layer.w1(x)) * layer.w3(x))
        return self.output(x)


def _linear_paths(captured) -> set[str]:
    return {module_path(n) for n in captured.graph.nodes if n.target == torch.ops.aten.linear.default}


def test_plain_decoder_with_a_tensor_example():
    torch.manual_seed(0)
    model = FusedQKVDecoder()
    ids = torch.randint(0, 50, (3, 40))
    captured = capture(model, ids)
    assert captured.fallback == ""
    assert tuple(captured.args[0].shape) == (1, 32) and captured.kwargs == {}  # cut to batch 1, 32 tokens
    assert {"blocks.0.c_attn", "blocks.1.c_proj", "blocks.1.mlp_proj", "lm_head"} <= _linear_paths(captured)
    assert any(n.target == torch.ops.aten.scaled_dot_product_attention.default for n in captured.graph.nodes)


def test_plain_decoder_with_a_tuple_example():
    torch.manual_seed(0)
    model = WrittenOutGQADecoder()
    ids = torch.randint(0, 50, (2, 9))
    captured = capture(model, (ids, 2.0))
    assert captured.fallback == ""
    assert captured.args[1] == 2.0 and tuple(captured.args[0].shape) == (1, 9)
    assert {f"layers.{i}.{w}" for i in range(2) for w in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")} <= (
        _linear_paths(captured))
    assert any("softmax" in str(n.target) for n in captured.graph.nodes)
    with torch.no_grad():  # the captured example runs the model as given
        assert model(*captured.args, **captured.kwargs).shape == (1, 9, 50)


def test_plain_decoder_without_example_gets_token_ids():
    captured = capture(FusedQKVDecoder())
    assert captured.args[0].dtype == torch.long and tuple(captured.args[0].shape) == (1, 7)


def test_eager_only_attention_falls_back_to_the_models_own_implementation():
    from transformers import AutoModelForCausalLM, Gemma2Config

    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=32,
                          attn_logit_softcapping=50.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    captured = capture(model)  # SDPA refuses the soft-capping: the usual export fails
    assert captured.fallback == "the model's own attention implementation"
    assert model.config._attn_implementation == "eager"  # put back
    assert not any(n.target == torch.ops.aten.scaled_dot_product_attention.default for n in captured.graph.nodes)
    info = capture_graph(model=model, example_inputs=None).info
    assert info.endswith("(capture fallback: the model's own attention implementation)")


def test_output_holding_a_cache_falls_back_to_the_logits():
    model = tiny_model("llama")
    example = {"input_ids": torch.arange(7).unsqueeze(0), "use_cache": True}  # the output holds a DynamicCache
    captured = capture(model, example)
    assert captured.fallback == "only the logits as output"
    usual = capture(model)
    assert sorted(captured.param_names.values()) == sorted(usual.param_names.values())  # the model's own names
    assert _linear_paths(captured) == _linear_paths(usual)
    assert fxsparse.inspect(model, example).to_dict()["blocks"] == fxsparse.inspect(model).to_dict()["blocks"]


class _NoUseCache(nn.Module):
    """Has a transformers-like config but its forward takes no use_cache keyword."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=30)
        self.embed, self.proj = nn.Embedding(30, 8), nn.Linear(8, 30)

    def forward(self, input_ids):
        return self.proj(self.embed(input_ids))


def test_forward_without_use_cache_falls_back_to_dropping_it():
    captured = capture(_NoUseCache())
    assert captured.fallback == "without use_cache" and captured.kwargs == {}


class _NeedsEvenLength(nn.Module):
    """Works only on sequences of an even length (pairs tokens), so the made-up 7-token example fails."""

    def __init__(self):
        super().__init__()
        self.embed, self.proj = nn.Embedding(30, 8), nn.Linear(16, 30)

    def forward(self, ids):
        x = self.embed(ids)
        return self.proj(x.reshape(x.shape[0], x.shape[1] // 2, 16))


def test_another_example_length():
    captured = capture(_NeedsEvenLength())
    assert captured.fallback == "example of 16 tokens" and tuple(captured.args[0].shape) == (1, 16)


class _Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        raise RuntimeError("this forward always fails")


def test_nothing_works_names_the_usual_error_and_what_was_tried():
    with pytest.raises(ValueError, match="this forward always fails") as info:
        capture(_Broken())
    assert "also tried:" in str(info.value) and "strict export" in str(info.value)


def test_attempts_start_with_the_usual_export():
    assert ATTEMPTS[0].name == "" and ATTEMPTS[0].attention == "sdpa" and not ATTEMPTS[0].strict
    assert len({a.name for a in ATTEMPTS}) == len(ATTEMPTS)


def test_data_dependent_expert_loop_falls_back_to_batched_experts():
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=32)
    torch.manual_seed(0)
    # eager experts loop over the experts the router hit: a guard on a router output stops export
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", experts_implementation="eager")
    captured = capture(model.eval())
    assert captured.fallback == "experts as batched_mm"
    assert model.get_experts_implementation() == {"": "eager"}  # put back
    assert not any(n.target == torch.ops.aten.nonzero.default for n in captured.graph.nodes)
