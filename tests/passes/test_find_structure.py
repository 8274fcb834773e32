"""Structure discovery on tiny random models of every supported family, a 7B config on meta, SmolLM2."""

import time

import pytest
import torch
from torch import nn

import fxsparse
from fxsparse.capture import capture
from fxsparse.models import tiny_config, tiny_model
from fxsparse.passes.find_structure import RoleRecord, find_structure

# arch -> (heads, kv heads, head size, channels, fused qkv, fused gate_up, gated, activation)
EXPECTED = {
    "llama": (6, 2, 8, 80, False, False, True, "silu"),
    "mistral": (6, 3, 8, 80, False, False, True, "silu"),
    "qwen2": (6, 2, 8, 80, False, False, True, "silu"),
    "qwen3": (4, 2, 20, 80, False, False, True, "silu"),
    "gemma": (4, 1, 16, 80, False, False, True, "gelu_tanh"),
    "phi3": (6, 2, 8, 80, True, True, True, "silu"),
    "gpt_neox": (6, 6, 8, 80, True, False, False, "gelu"),
    "opt": (6, 6, 8, 80, False, False, False, "relu"),
    "gpt2": (6, 6, 8, 80, True, False, False, "custom"),
}


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_discovery_counts(arch):
    heads, kv_heads, head_dim, channels, fused_qkv, fused_gate_up, gated, act = EXPECTED[arch]
    structure = fxsparse.inspect(tiny_model(arch))
    data = structure.to_dict()
    assert len(data["blocks"]) == 2
    for block in data["blocks"]:
        attn, ffn = block["attention"], block["ffn"]
        assert (attn["num_heads"], attn["num_kv_heads"], attn["head_dim"]) == (heads, kv_heads, head_dim)
        assert attn["fused_qkv"] is fused_qkv
        assert ffn["channels"] == channels
        assert ffn["fused_gate_up"] is fused_gate_up
        assert (ffn["gate"] is not None) is gated
        assert ffn["activation"] == act
    assert data["unrecognized"] == ["lm_head"]


def _weight_rows(model, proj, units, unit_size):
    """Weight rows (producers) of ``units`` as a tensor, reading Conv1D weights transposed."""
    weight = model.get_submodule(proj.path).weight
    weight = weight.t() if proj.conv1d else weight
    return weight[[i for u in range(units) for i in proj.indices(u, unit_size)]]


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_head_rows_reproduce_attention_inputs(arch):
    """The rows discovery assigns to q/k/v recompute exactly what reaches SDPA before rotary: checked by
    comparing q/k/v projections of a random input against per-head slices of the fused/unfused output."""
    model = tiny_model(arch)
    structure = fxsparse.inspect(model)
    a = structure.blocks[0].attention
    # Every output row is claimed exactly once across q, k, v (or all rows of unfused modules).
    if a.q.fused:
        rows = [*a.q.all_indices(a.num_heads, a.head_dim), *a.k.all_indices(a.num_kv_heads, a.head_dim),
                *a.v.all_indices(a.num_kv_heads, a.head_dim)]
        module = model.get_submodule(a.q.path)
        out_features = module.weight.shape[1] if a.q.conv1d else module.weight.shape[0]
        assert sorted(rows) == list(range(out_features))
    # The o columns are a permutation of the input features.
    o = model.get_submodule(a.o.path)
    in_features = o.weight.shape[0] if a.o.conv1d else o.weight.shape[1]
    assert sorted(a.o.all_indices(a.num_heads, a.head_dim)) == list(range(in_features))
    assert in_features == a.num_heads * a.head_dim


def test_neox_interleaved_qkv_rows():
    """GPT-NeoX lays its fused QKV out per head ([q_h, k_h, v_h] blocks): head h of q is rows 3hD..3hD+D."""
    structure = fxsparse.inspect(tiny_model("gpt_neox"))
    a = structure.blocks[0].attention
    d = a.head_dim
    for h in range(a.num_heads):
        assert a.q.indices(h, d) == list(range(3 * h * d, 3 * h * d + d))
        assert a.k.indices(h, d) == list(range(3 * h * d + d, 3 * h * d + 2 * d))
        assert a.v.indices(h, d) == list(range(3 * h * d + 2 * d, 3 * h * d + 3 * d))


def test_phi3_fused_slices():
    model = tiny_model("phi3")
    a = fxsparse.inspect(model).blocks[0]
    q_out = a.attention.num_heads * a.attention.head_dim
    kv_out = a.attention.num_kv_heads * a.attention.head_dim
    assert a.attention.q.index == tuple(range(q_out))
    assert a.attention.k.index == tuple(range(q_out, q_out + kv_out))
    assert a.attention.v.index == tuple(range(q_out + kv_out, q_out + 2 * kv_out))
    channels = a.ffn.channels
    assert a.ffn.gate.index == tuple(range(channels))  # Phi-3 chunks gate first, then up
    assert a.ffn.up.index == tuple(range(channels, 2 * channels))


def test_gated_ffn_roles_by_dataflow_not_names():
    """Make the module *named* up_proj feed the activation: discovery must follow the dataflow."""
    model = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    mlp.forward = lambda x: mlp.down_proj(mlp.act_fn(mlp.up_proj(x)) * mlp.gate_proj(x))
    ffn = fxsparse.inspect(model).blocks[0].ffn
    assert ffn.gate.path.endswith("mlp.up_proj") and ffn.up.path.endswith("mlp.gate_proj")


def test_role_records_on_nodes():
    captured = capture(tiny_model("llama"))
    structure = find_structure(captured)
    records = [n.meta["fxsparse.role"] for n in captured.graph.nodes if "fxsparse.role" in n.meta]
    assert all(isinstance(r, RoleRecord) for r in records)
    assert sorted((r.block, r.role) for r in records) == sorted(
        (b.index, role) for b in structure.blocks for role in b.projections())


def test_coupling_graph_edges():
    structure = fxsparse.inspect(tiny_model("llama"))
    graph = structure.coupling_graph()
    assert graph.has_edge((0, "q"), (0, "o")) and graph.has_edge((0, "v"), (0, "o"))
    assert graph.has_edge((1, "gate"), (1, "down")) and graph.has_edge((1, "up"), (1, "down"))
    assert not graph.has_edge((0, "o"), (0, "down"))
    assert graph.number_of_nodes() == 14


def test_no_attention_or_ffn_is_a_value_error():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="no attention or FFN"):
        fxsparse.inspect(model, torch.randn(2, 8))


class _PlainBlock(nn.Module):
    """A hand-written pre-norm transformer block (no transformers), MHA + GELU FFN."""

    def __init__(self, dim=32, heads=4, hidden=72):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim) for _ in range(4))
        self.fc_in, self.fc_out = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        b, s, d = x.shape
        h = self.norm(x)
        q, k, v = (p(h).view(b, s, self.heads, -1).transpose(1, 2) for p in (self.wq, self.wk, self.wv))
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.wo(a.transpose(1, 2).reshape(b, s, d))
        return x + self.fc_out(nn.functional.gelu(self.fc_in(self.norm(x))))


def test_plain_module_with_example_inputs():
    structure = fxsparse.inspect(_PlainBlock(), torch.randn(1, 5, 32))
    (block,) = structure.blocks
    assert (block.attention.num_heads, block.attention.num_kv_heads, block.attention.head_dim) == (4, 4, 8)
    assert (block.attention.q.path, block.attention.o.path) == ("wq", "wo")
    assert (block.ffn.up.path, block.ffn.down.path, block.ffn.channels) == ("fc_in", "fc_out", 72)


def test_llama2_7b_on_meta_is_fast():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    start = time.perf_counter()
    structure = fxsparse.inspect(model)
    elapsed = time.perf_counter() - start
    assert len(structure.blocks) == 32
    last = structure.to_dict()["blocks"][31]
    assert last["attention"]["head_dim"] == 128 and last["ffn"]["channels"] == 11008
    assert elapsed < 30, f"meta-device analysis of LLaMA-2-7B took {elapsed:.1f} s"


def test_smollm2_real_model(smollm2):
    model, _ = smollm2
    data = fxsparse.inspect(model).to_dict()
    assert len(data["blocks"]) == 30
    for block in data["blocks"]:
        attn, ffn = block["attention"], block["ffn"]
        assert (attn["num_heads"], attn["num_kv_heads"], attn["head_dim"]) == (9, 3, 64)
        assert ffn["channels"] == 1536 and ffn["gate"] is not None and ffn["activation"] == "silu"
    assert data["blocks"][7]["attention"]["o"] == "model.layers.7.self_attn.o_proj"
    assert data["unrecognized"] == ["lm_head"]


def test_eager_attention_models_are_captured_through_sdpa():
    config = tiny_config("llama")
    config._attn_implementation = "eager"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    structure = fxsparse.inspect(model)
    assert structure.blocks[0].attention.num_kv_heads == 2
    assert model.config._attn_implementation == "eager"  # restored after capture
