"""Structure discovery on tiny random models of every supported family, a 7B config on meta, SmolLM2,
hand-written attention with per-head operands, one-token and large example inputs."""

import time

import pytest
import torch
from torch import nn

import fxsparse
import fxsparse.passes.find_structure as find_structure_module
from fxsparse.capture import capture
from fxsparse.models import tiny_config, tiny_model
from fxsparse.passes.find_structure import find_structure

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


def _record_attention(model, x):
    """Run ``model(x)``; return the first SDPA call's (query, key, value, output) and every module's
    output and first input, by module path."""
    calls, outputs, inputs = [], {}, {}
    real_sdpa = nn.functional.scaled_dot_product_attention

    def sdpa(query, key, value, *args, **kwargs):
        out = real_sdpa(query, key, value, *args, **kwargs)
        calls.append((query, key, value, out))
        return out

    def hook(path):
        def record(module, args, output):
            outputs.setdefault(path, output)
            if args:  # decoder layers are called with keyword arguments only
                inputs.setdefault(path, args[0])
        return record

    handles = [m.register_forward_hook(hook(path)) for path, m in model.named_modules() if path]
    try:
        nn.functional.scaled_dot_product_attention = sdpa
        with torch.no_grad():
            model(x)
    finally:
        nn.functional.scaled_dot_product_attention = real_sdpa
        for handle in handles:
            handle.remove()
    return calls[0], outputs, inputs


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_head_rows_are_what_reaches_the_attention(arch):
    """Run the model: the v rows discovery assigns to each KV head are exactly the value the attention
    gets for it, and the o columns of each head are exactly that head's attention output. q and k are
    checked the same way where nothing but reshapes lies between them and the attention (GPT-2; OPT
    scales q, so only k there); rotary embeddings change them elsewhere."""
    model = tiny_model(arch)
    a = fxsparse.inspect(model).blocks[0].attention
    x = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    (query, key, value, out), outputs, inputs = _record_attention(model, x)
    d = a.head_dim

    def rows(proj, unit):
        produced = outputs[proj.path]
        return produced[..., proj.indices(unit, d)]

    def head(tensor, unit, units):
        per_group = tensor.shape[1] // units  # k/v repeated to every query head (repeat_kv) or not
        return tensor[:, unit * per_group]

    for j in range(a.num_kv_heads):
        torch.testing.assert_close(rows(a.v, j), head(value, j, a.num_kv_heads), rtol=0, atol=0)
    o_input = inputs[a.o.path]
    for h in range(a.num_heads):
        torch.testing.assert_close(o_input[..., a.o.indices(h, d)], out[:, h], rtol=0, atol=0)
    checked = {"gpt2": ("q", "k"), "opt": ("k",)}.get(arch, ())
    for role in checked:
        proj, units, tensor = (a.q, a.num_heads, query) if role == "q" else (a.k, a.num_kv_heads, key)
        for j in range(units):
            torch.testing.assert_close(rows(proj, j), head(tensor, j, units), rtol=0, atol=0)


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


def test_find_structure_is_a_pass_that_writes_no_node_records():
    captured = capture(tiny_model("llama"))
    result = find_structure(captured=captured)
    assert not result.modified and set(result.outputs) == {"structure"}
    assert not [key for n in captured.graph.nodes for key in n.meta if key.startswith("fxsparse")]


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


class _TwoBlocks(nn.Module):
    """Two hand-written blocks; ``variant`` gives block 0's attention a per-head operand outside the linears:
    ``gain`` (a learned gain per query head), ``alibi`` (a per-head slope times distance as the mask),
    ``sink`` (a learned key/value per head concatenated before the sequence) or ``bias`` (a bias added to
    Q outside its bias-free linear). ``rope`` applies a rotary-style position factor, shared by all heads."""

    def __init__(self, variant="", dim=32, heads=4, hidden=40):
        super().__init__()
        self.variant, self.heads, self.head_dim = variant, heads, dim // heads
        self.blocks = nn.ModuleList(_PlainBlock(dim, heads, hidden) for _ in range(2))
        self.blocks[0].wq = nn.Linear(dim, dim, bias=False)
        generator = torch.Generator().manual_seed(0)
        self.gain = nn.Parameter(0.5 + torch.rand(heads, generator=generator))
        self.sink = nn.Parameter(torch.randn(1, heads, 1, self.head_dim, generator=generator))
        self.q_bias = nn.Parameter(torch.randn(dim, generator=generator))
        self.register_buffer("slopes", 2.0 ** -torch.arange(1, heads + 1, dtype=torch.float32))

    def _attention(self, block, x, first):
        b, s, d = x.shape
        h = block.norm(x)
        q = block.wq(h)
        if first and self.variant == "bias":
            q = q + self.q_bias
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in (q, block.wk(h), block.wv(h)))
        if self.variant == "rope":
            angle = torch.arange(s, dtype=x.dtype).view(1, 1, s, 1) * 0.1
            q, k = q * angle.cos(), k * angle.cos()
        mask = None
        if first and self.variant == "gain":
            q = q * self.gain.view(1, -1, 1, 1)
        if first and self.variant == "alibi":
            distance = torch.arange(s).view(1, s) - torch.arange(s).view(s, 1)
            mask = self.slopes.view(1, -1, 1, 1) * distance.clamp(max=0).to(x.dtype)
        if first and self.variant == "sink":
            k = torch.cat([self.sink.expand(b, -1, -1, -1), k], dim=2)
            v = torch.cat([torch.zeros_like(v[:, :, :1]), v], dim=2)
        a = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return x + block.wo(a.transpose(1, 2).reshape(b, s, d))

    def forward(self, x):
        for i, block in enumerate(self.blocks):
            x = self._attention(block, x, i == 0)
            x = x + block.fc_out(nn.functional.gelu(block.fc_in(block.norm(x))))
        return x


@pytest.mark.parametrize("variant, why", [("gain", "gain (seen as [1, 4, 1, 1])"), ("alibi", "mask slopes"),
                                          ("sink", "sink (seen as [1, 4, 1, 8])"), ("bias", "q_bias (seen as [32])")])
def test_per_head_operand_outside_the_linears_keeps_those_heads_in_place(variant, why):
    """The attention is found, its heads counted, and marked ``fixed_order`` with the reason: they may be
    selected and trained, never permuted. The other block's heads stay free to move."""
    structure = fxsparse.inspect(_TwoBlocks(variant), torch.randn(1, 5, 32))
    first, second = structure.blocks
    assert first.attention is not None and first.ffn is not None
    assert (first.attention.num_heads, first.attention.num_kv_heads, first.attention.head_dim) == (4, 4, 8)
    assert why in first.attention.fixed_order and "permuting heads would change" in first.attention.fixed_order
    assert second.attention is not None and second.attention.fixed_order == ""
    assert not any(path.startswith("blocks.0.w") for path in structure.unrecognized)
    entry = structure.to_dict()["blocks"][0]["attention"]
    assert entry["fixed_order"] == first.attention.fixed_order and "fixed_order" not in (
        structure.to_dict()["blocks"][1]["attention"])


@pytest.mark.parametrize("variant", ["gain", "alibi", "sink", "bias"])
def test_fixed_order_heads_train_in_place_and_the_function_is_kept(variant):
    """S²FT selects heads of the fixed-order attention without moving them: the output is unchanged in float64,
    no weight of that attention moved, its trained blocks are gathered where needed, and merge gives back
    the original weights bit for bit."""
    torch.manual_seed(0)
    model = _TwoBlocks(variant).double()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    before = model(x)
    fxsparse.transform(model, "s2ft", ratios={"q": 0.5, "k": 0.5, "v": 0.5, "o": 0.5}, seed=3,
                       example_inputs=(x[:1],))
    torch.testing.assert_close(model(x), before, rtol=1e-12, atol=1e-12)
    wq = model.blocks[0].wq
    assert type(wq).__name__ == "S2FTLinear"
    assert wq.index.tolist() == wq.origin.tolist()  # no permutation: the trained rows are where they were
    frozen_rows = [r for r in range(32) if r not in set(wq.index.tolist())]
    assert torch.equal(wq.weight[frozen_rows], original["blocks.0.wq.weight"][frozen_rows])
    for name in ("wk", "wv", "wo"):  # the attention's other projections did not move either
        layer = getattr(model.blocks[0], name)
        assert type(layer).__name__ != "S2FTLinear" or layer.index.tolist() == layer.origin.tolist()
    fxsparse.merge(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())


def test_operands_shared_by_all_heads_do_not_stop_discovery():
    """Position factors (rotary), q/k norms over head_dim (Qwen3, Gemma) and GQA repeats are the same for
    every head: both attentions are found."""
    structure = fxsparse.inspect(_TwoBlocks("rope"), torch.randn(1, 5, 32))
    assert all(block.attention is not None for block in structure.blocks) and not structure.reasons


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "gpt_neox", "gpt2"])
def test_one_token_example_finds_the_same_structure(arch):
    model = tiny_model(arch)
    assert fxsparse.inspect(model, torch.tensor([[5]])).to_dict() == fxsparse.inspect(model).to_dict()


def test_a_large_example_is_cut_before_provenance_is_built(monkeypatch):
    """An 8 x 2048 example is captured as 1 x 32 tokens, and only linears feeding the attention or an FFN
    product get provenance tensors: never the LM head (96 outputs here)."""
    model = tiny_model("llama")
    expected = fxsparse.inspect(model).to_dict()
    shapes = []
    real = find_structure_module._provenance
    monkeypatch.setattr(find_structure_module, "_provenance", lambda shape: shapes.append(shape) or real(shape))
    captured = capture(model, torch.zeros(8, 2048, dtype=torch.long))
    assert tuple(captured.args[0].shape) == (1, 32)
    assert find_structure(captured=captured).outputs["structure"].to_dict() == expected
    assert sorted({shape for shape in shapes}) == [(1, 32, 16), (1, 32, 48)]  # q, and k/v: no LM head (96)


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
