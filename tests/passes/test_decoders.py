"""Structure discovery beyond transformers' SDPA path: hand-written decoders, written-out attention, projections
that are not ``aten.linear``, mixture-of-experts FFNs, blocks of different sizes and attention variants.

Every test checks what discovery found against the truth of the model AND that S²FT with every projection
selected computes the same logits, and so does the merge; an unrecognised construct must come with its reason
and leave the function exact."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsparse

ROLES = ("q", "k", "v", "o", "gate", "up", "down")


def _exact_s2ft(model, example=None, x=None, seed=1):
    """transform (every role the structure has, half its units) -> same logits; merge -> same logits."""
    x = example if x is None else x
    inputs = x if isinstance(x, tuple) else (x,)

    def logits():
        with torch.no_grad():
            out = model(*inputs)
        return getattr(out, "logits", out)

    before = logits()
    structure = fxsparse.inspect(model, example)
    roles = {role: 0.5 for role in ROLES if any(role in b.projections() for b in structure.blocks)}
    model = fxsparse.transform(model, "s2ft", example_inputs=example, ratios=roles, seed=seed)
    assert any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(logits(), before, rtol=1e-5, atol=1e-5)
    model = fxsparse.merge(model)
    torch.testing.assert_close(logits(), before, rtol=1e-5, atol=1e-5)
    return structure


def _heads(block):
    a = block.attention
    return None if a is None else (a.num_heads, a.num_kv_heads, a.head_dim)


# ---------------------------------------------------------------------------------------------------------------
# Hand-written decoders (nanoGPT / gpt-fast style)


class _FusedWrittenOut(nn.Module):
    """nanoGPT-style block: fused ``c_attn`` split in three, attention written out (``q @ k^T``, causal mask,
    softmax, ``@ v``), GELU MLP. ``variant``: ``alibi`` adds per-head slopes to the scores, ``sink`` concatenates a
    learned logit per head before the softmax (attention sinks)."""

    def __init__(self, dim=48, heads=6, hidden=80, variant=""):
        super().__init__()
        self.heads, self.variant = heads, variant
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.c_fc, self.mlp_proj = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.register_buffer("slopes", 2.0 ** -torch.arange(1, heads + 1, dtype=torch.float32))
        self.sinks = nn.Parameter(torch.randn(heads))

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        if self.variant == "alibi":
            distance = (torch.arange(t).view(1, t) - torch.arange(t).view(t, 1)).clamp(max=0).to(x.dtype)
            scores = scores + self.slopes.view(1, -1, 1, 1) * distance
        causal = torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device))
        scores = scores.masked_fill(~causal, float("-inf"))
        if self.variant == "sink":
            scores = torch.cat([scores, self.sinks.view(1, -1, 1, 1).expand(b, -1, t, 1)], dim=-1)
            scores = scores - scores.amax(dim=-1, keepdim=True)
        probs = F.softmax(scores, dim=-1)
        if self.variant == "sink":
            probs = probs[..., :-1]
        if self.variant == "zeroed":  # CPM-Ant: masked probabilities set to 0 again, one mask for every head
            probs = torch.masked_fill(probs, (~causal).view(1, 1, t, t), torch.scalar_tensor(0.0))
        if self.variant == "head_scaled":  # a weight per head on the probabilities
            probs = probs * self.slopes.view(1, -1, 1, 1)
        y = (probs @ v).transpose(1, 2).contiguous().view(b, t, c)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class _GQA(nn.Module):
    """gpt-fast-style block: separate q/k/v, GQA by ``repeat_interleave`` (or ``repeat``, which pairs query head
    h with KV head h % kv), ``F.scaled_dot_product_attention(is_causal=True)``, SwiGLU FFN."""

    def __init__(self, dim=48, heads=6, kv_heads=2, hidden=80, repeat="interleave", gate=""):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.repeat, self.gate = heads, kv_heads, dim // heads, repeat, gate
        if gate:  # an output gate: sigmoid(g(x)) per feature ("full") or per head ("head"), before wo
            self.g = nn.Linear(dim, heads if gate == "head" else heads * self.head_dim, bias=False)
            self.gate_bias = nn.Parameter(torch.randn(heads, 1))  # per head: used by gate="bias"
        self.attention_norm, self.ffn_norm = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.wq = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(heads * self.head_dim, dim, bias=False)
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def attention(self, x):
        b, t, _ = x.shape
        y = self.attention_norm(x)
        q = self.wq(y).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.wk(y).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(y).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        groups = self.heads // self.kv_heads
        if self.repeat == "interleave":
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        else:
            k, v = k.repeat(1, groups, 1, 1), v.repeat(1, groups, 1, 1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
        if self.gate == "head":
            out = out * torch.sigmoid(self.g(y)).unsqueeze(-1)
        elif self.gate:
            gate = self.g(y).view(b, t, self.heads, self.head_dim)
            out = out * torch.sigmoid(gate + self.gate_bias if self.gate == "bias" else gate)
        return x + self.wo(out.reshape(b, t, -1))

    def forward(self, x):
        x = self.attention(x)
        y = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(y)) * self.w3(y))


class _Expert(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w_gate, self.w_up = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class _MoE(_GQA):
    """GQA attention and a mixture-of-experts FFN: a shared expert plus 4 routed experts of different widths,
    each with its own nn.Linear projections, top-2 routing by a dense mask."""

    WIDTHS = (24, 28, 32, 36)

    def __init__(self, dim=48):
        super().__init__(dim)
        del self.w1, self.w2, self.w3
        self.router = nn.Linear(dim, len(self.WIDTHS), bias=False)
        self.shared = _Expert(dim, 56)
        self.experts = nn.ModuleList(_Expert(dim, width) for width in self.WIDTHS)

    def forward(self, x):
        x = self.attention(x)
        y = self.ffn_norm(x)
        probs = F.softmax(self.router(y), dim=-1)
        top = probs.topk(2, dim=-1)
        weights = torch.zeros_like(probs).scatter(-1, top.indices, top.values)
        out = self.shared(y)
        for e, expert in enumerate(self.experts):
            out = out + weights[..., e:e + 1] * expert(y)
        return x + out


class _Decoder(nn.Module):
    def __init__(self, make_block, layers=2, vocab=96, dim=48):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(make_block() for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _tokens(batch=2, seq=9):
    return torch.randint(0, 96, (batch, seq), generator=torch.Generator().manual_seed(0))


def _decoder(make_block):
    torch.manual_seed(0)
    return _Decoder(make_block).eval()


@pytest.mark.parametrize("given", ["tensor", "tuple"])
def test_fused_qkv_written_out_attention(given):
    model, x = _decoder(_FusedWrittenOut), _tokens()
    structure = _exact_s2ft(model, x if given == "tensor" else (x,))
    assert len(structure.blocks) == 2 and structure.unrecognized == ["head"]
    for i, block in enumerate(structure.blocks):
        assert _heads(block) == (6, 6, 8)
        a = block.attention
        assert {a.q.path, a.k.path, a.v.path} == {f"blocks.{i}.c_attn"} and a.o.path == f"blocks.{i}.c_proj"
        assert a.q.index == tuple(range(48)) and a.k.index == tuple(range(48, 96))  # split(C): q | k | v
        assert (block.ffn.up.path, block.ffn.down.path, block.ffn.channels) == (
            f"blocks.{i}.c_fc", f"blocks.{i}.mlp_proj", 80)


def test_written_out_attention_with_probabilities_masked_for_every_head():
    """An elementwise op on the probabilities with operands shared by the heads (a mask) keeps the attention; a
    weight per head there is no such op: that attention is left out with its reason, and S²FT stays exact."""
    model, x = _decoder(lambda: _FusedWrittenOut(variant="zeroed")), _tokens()
    structure = _exact_s2ft(model, x)
    assert all(_heads(b) == (6, 6, 8) and not b.attention.fixed_order for b in structure.blocks)
    model = _decoder(lambda: _FusedWrittenOut(variant="head_scaled"))
    structure = _exact_s2ft(model, x)
    assert all(b.attention is None and b.ffn is not None for b in structure.blocks)
    assert "reach no matmul with the values" in structure.reasons["blocks.0.c_attn"]


@pytest.mark.parametrize("given", ["tensor", "tuple"])
def test_gqa_repeat_interleave_and_sdpa_is_causal(given):
    model, x = _decoder(_GQA), _tokens()
    structure = _exact_s2ft(model, x if given == "tensor" else (x,))
    assert structure.unrecognized == ["head"]
    for i, block in enumerate(structure.blocks):
        assert _heads(block) == (6, 2, 8)
        assert (block.attention.k.path, block.ffn.gate.path, block.ffn.up.path) == (
            f"blocks.{i}.wk", f"blocks.{i}.w1", f"blocks.{i}.w3")


@pytest.mark.parametrize("gate, rows_per_head", [("full", 8), ("head", 1)])
def test_output_gated_attention(gate, rows_per_head):
    """``out * sigmoid(g(x))`` before wo (Qwen3-Next, AFMoE, LFM): g's rows of each head move with the heads."""
    model, x = _decoder(lambda: _GQA(gate=gate)), _tokens()
    structure = _exact_s2ft(model, x)
    for i, block in enumerate(structure.blocks):
        assert _heads(block) == (6, 2, 8)
        (g,) = block.attention.gates
        assert g.path == f"blocks.{i}.g" and g.index == tuple(range(6 * rows_per_head))
    assert structure.to_dict()["blocks"][0]["attention"]["gates"] == ["blocks.0.g"]
    assert structure.unrecognized == ["head"]


def test_output_gate_with_a_per_head_bias_keeps_the_heads_in_place():
    """The gate cannot follow a head permutation: the heads are selected and trained where they are, the
    gate's linear stays dense with the reason, and S²FT is exact (``_exact_s2ft``)."""
    model, x = _decoder(lambda: _GQA(gate="bias")), _tokens()
    structure = _exact_s2ft(model, x)
    for block in structure.blocks:
        assert _heads(block) == (6, 2, 8) and "would not move with the heads" in block.attention.fixed_order
        assert block.attention.gates == () and f"blocks.{block.index}.g" in structure.unrecognized
    assert "not trained" in structure.reasons["blocks.0.g"]


def test_gqa_tiled_repeat_keeps_the_heads_in_place():
    """``k.repeat(1, groups, 1, 1)`` pairs query head h with KV head h % kv, not h // groups: permuting heads
    the GQA way would change the function, so they stay where they are (and S²FT is exact)."""
    model, x = _decoder(lambda: _GQA(repeat="tile")), _tokens()
    structure = _exact_s2ft(model, x)
    assert all(_heads(block) == (6, 2, 8) and block.ffn is not None for block in structure.blocks)
    assert "KV heads are repeated in another order" in structure.blocks[0].attention.fixed_order


@pytest.mark.parametrize("variant, why", [("alibi", "slopes"), ("sink", "attention sinks")])
def test_written_out_per_head_scores_keep_the_heads_in_place(variant, why):
    model, x = _decoder(lambda: _FusedWrittenOut(variant=variant)), _tokens()
    structure = _exact_s2ft(model, x)
    first = structure.blocks[0].attention
    assert _heads(structure.blocks[0]) == (6, 6, 8)
    assert why in first.fixed_order and "permuting heads would change the function" in first.fixed_order
    assert structure.unrecognized == ["head"]


def test_moe_with_per_expert_linears():
    """Each expert and the shared expert is an FFN of its own (its channels are units), listed under the block's
    "experts"; the router is reported, not guessed."""
    model, x = _decoder(_MoE), _tokens()
    structure = _exact_s2ft(model, x)
    data = structure.to_dict()
    assert len(data["blocks"]) == 2
    for i, entry in enumerate(data["blocks"]):
        assert (entry["attention"]["num_heads"], entry["attention"]["num_kv_heads"]) == (6, 2)
        assert entry["ffn"]["down"] == f"blocks.{i}.shared.w_down" and entry["ffn"]["channels"] == 56
        experts = entry["experts"]
        assert [e["channels"] for e in experts] == list(_MoE.WIDTHS)
        assert [e["gate"] for e in experts] == [f"blocks.{i}.experts.{e}.w_gate" for e in range(4)]
        for e in experts:
            assert structure.blocks[e["block"]].part_of == entry["index"]
    assert set(structure.unrecognized) == {"blocks.0.router", "blocks.1.router", "head"}


class _NotALinear(nn.Module):
    """A projection module that is not nn.Linear: ``x @ weight.T`` on its own parameter."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim_out, dim_in) / dim_in ** 0.5)

    def forward(self, x):
        return x @ self.weight.T


class _MatmulLinear(nn.Linear):
    """An nn.Linear (like Falcon's FalconLinear) that computes ``x @ W.T + b`` with a matmul."""

    def forward(self, x):
        out = x @ self.weight.T
        return out if self.bias is None else out + self.bias


def test_matmul_projections_and_modules_that_cannot_be_replaced():
    """``x @ W.T (+ b)`` of an nn.Linear subclass is a projection like ``aten.linear``; the same product by a
    module that is no nn.Linear is reported with why (S²FT could not replace it) and its block stays dense."""
    def block():
        b = _GQA()
        b.wq, b.wk, b.wv, b.wo = (_MatmulLinear(m.in_features, m.out_features) for m in (b.wq, b.wk, b.wv, b.wo))
        b.w2 = _NotALinear(80, 48)
        return b

    model, x = _decoder(block), _tokens()
    structure = _exact_s2ft(model, x)
    for block in structure.blocks:
        assert _heads(block) == (6, 2, 8) and block.ffn is None
    assert "blocks.0.w2" in structure.unrecognized
    assert "no nn.Linear/Conv1D" in structure.reasons["blocks.0.w2"]


def test_a_structure_run_twice_is_one_structure():
    """A looped FFN (the same three linears applied twice per block, as looped decoders do): its channels move
    inside modules only ever called together, exact for both calls."""
    class Twice(_GQA):
        def forward(self, x):
            x = self.attention(x)
            for _ in range(2):
                y = self.ffn_norm(x)
                x = x + self.w2(F.silu(self.w1(y)) * self.w3(y))
            return x

    model, x = _decoder(Twice), _tokens()
    structure = _exact_s2ft(model, x)
    assert len(structure.blocks) == 2
    assert all(block.ffn.channels == 80 and _heads(block) == (6, 2, 8) for block in structure.blocks)


def test_a_module_also_called_outside_its_structure_is_left_out():
    """w3 is the FFN's up projection and is called once more outside it: permuting its rows for the FFN would
    change that other call, so the FFN stays dense with the reason."""
    class Shared(_GQA):
        def forward(self, x):
            x = self.attention(x)
            y = self.ffn_norm(x)
            x = x + self.w2(F.silu(self.w1(y)) * self.w3(y))
            return x + 0.1 * self.w3(x)[..., :1]

    model, x = _decoder(Shared), _tokens()
    structure = _exact_s2ft(model, x)
    assert all(block.ffn is None and _heads(block) == (6, 2, 8) for block in structure.blocks)
    assert "called 2 times" in structure.reasons["blocks.0.w2"] and "shared with something else" in (
        structure.reasons["blocks.0.w2"])


# ---------------------------------------------------------------------------------------------------------------
# transformers architectures (tiny configs built here)


def _hf(config_cls, **kwargs):
    from transformers import AutoModelForCausalLM

    common = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=64)
    common.update(kwargs)
    import transformers

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(getattr(transformers, config_cls)(**common)).eval()


@pytest.fixture
def written_out_sdpa(monkeypatch):
    """Make transformers' "sdpa" attention the written-out eager one (matmul, softmax, matmul), whatever
    implementation capture asks for: discovery must find the same heads there."""
    from transformers.modeling_utils import AttentionInterface
    from transformers.models.llama.modeling_llama import eager_attention_forward

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", eager_attention_forward)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_transformers_written_out_attention(arch, written_out_sdpa):
    if arch == "llama":
        model = _hf("LlamaConfig")
        expected = (6, 2, 8)
    else:  # logit soft-capping and alternating sliding-window layers
        from transformers.modeling_utils import AttentionInterface
        from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

        AttentionInterface._global_mapping["sdpa"] = eager_attention_forward  # restored by the fixture
        model = _hf("Gemma2Config", num_attention_heads=4, head_dim=16, sliding_window=4)
        expected = (4, 2, 16)
    structure = _exact_s2ft(model, x=torch.randint(0, 96, (1, 7)))
    assert [_heads(b) for b in structure.blocks] == [expected] * 2 and structure.unrecognized == ["lm_head"]


def test_blocks_of_different_sizes_and_stacked_experts():
    """Qwen2-MoE with a dense first layer: block 0's FFN has 80 channels, block 1's shared expert 56; the routed
    experts are 3-D parameters (not replaceable): reported with why, left dense."""
    model = _hf("Qwen2MoeConfig", moe_intermediate_size=24, shared_expert_intermediate_size=56, num_experts=4,
                num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[0])
    structure = _exact_s2ft(model, x=torch.randint(0, 96, (1, 7)))
    assert [b.ffn.channels for b in structure.blocks] == [80, 56]
    assert structure.blocks[1].ffn.down.path == "model.layers.1.mlp.shared_expert.down_proj"
    stacked = "model.layers.1.mlp.experts.gate_up_proj"
    assert stacked in structure.unrecognized and "stacked experts" in structure.reasons[stacked]


def test_qk_norm_over_the_whole_projection_moves_with_the_heads():
    """OLMo-2 normalises q and k over the whole projection (RMS over every head): the same whatever the head
    order, so the heads are permuted, and the norm weights' rows move with them (random weights here: a
    permutation that forgot them would change the logits)."""
    model = _hf("Olmo2Config")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    structure = _exact_s2ft(model, x=torch.randint(0, 96, (1, 7)))
    for i, block in enumerate(structure.blocks):
        assert _heads(block) == (6, 2, 8)
        norms = dict(block.attention.norms)
        assert (norms["q"].path, norms["k"].path) == (f"model.layers.{i}.self_attn.q_norm",
                                                      f"model.layers.{i}.self_attn.k_norm")
        assert norms["q"].index == tuple(range(48)) and norms["k"].index == tuple(range(16))
    assert structure.to_dict()["blocks"][0]["attention"]["norms"]["k"] == "model.layers.0.self_attn.k_norm"


def test_per_head_qk_norm_weights_keep_the_heads_in_place():
    """q/k norms with per-head weights (Cohere): no head permutation moves them, so the heads are trained where
    they are (S²FT exact, ``_exact_s2ft``)."""
    model = _hf("CohereConfig", use_qk_norm=True)
    structure = _exact_s2ft(model, x=torch.randint(0, 96, (1, 7)))
    for block in structure.blocks:
        assert _heads(block) == (6, 2, 8) and block.ffn.channels == 80
        assert "takes a different value per head" in block.attention.fixed_order


class _SubNormFFN(_GQA):
    """BitNet-style FFN: an RMSNorm with a weight over every channel between ``act(gate) * up`` and down
    (``"norm"``), or nGPT-style per-channel scales on gate and up (``"scale"``)."""

    def __init__(self, variant):
        super().__init__()
        self.variant = variant
        self.sub_norm = nn.RMSNorm(80)
        self.suv = nn.Parameter(0.5 + torch.rand(80))

    def forward(self, x):
        x = self.attention(x)
        y = self.ffn_norm(x)
        if self.variant == "norm":
            return x + self.w2(self.sub_norm(F.silu(self.w1(y)) * self.w3(y)))
        return x + self.w2(F.silu(self.w1(y) * self.suv) * (self.w3(y) * self.suv * 2.0))


@pytest.mark.parametrize("variant, why", [("norm", "rms_norm.default over every channel"),
                                          ("scale", "scales each channel on the way to the product")])
def test_ffn_whose_channels_cannot_move_trains_them_in_place(variant, why):
    """The FFN is found (gate told from up as usual) with ``fixed_order`` saying why; its channels are trained
    where they are, so S²FT is exact (``_exact_s2ft``), and no FFN weight row or column moved."""
    model, x = _decoder(lambda: _SubNormFFN(variant)), _tokens()
    with torch.no_grad():
        for block in model.blocks:
            block.sub_norm.weight.add_(torch.randn(80))  # a permutation that forgot the norm weight would show
    structure = _exact_s2ft(model, x)
    for i, block in enumerate(structure.blocks):
        f = block.ffn
        assert (f.gate.path, f.up.path, f.down.path, f.channels) == (f"blocks.{i}.w1", f"blocks.{i}.w3",
                                                                      f"blocks.{i}.w2", 80)
        assert why in f.fixed_order and "permuting channels" in f.fixed_order
        assert structure.to_dict()["blocks"][i]["ffn"]["fixed_order"] == f.fixed_order
    plan = fxsparse.transform(model, "s2ft", example_inputs=x, ratios={"down": 0.25, "up": 0.25})._fxsparse_s2ft
    assert all(getattr(p, "channels", None) is None for p in plan.perms.values())


class _ThresholdedFFN(_GQA):
    """Gemma 3n-style activation sparsity: the gate is cut at a statistic of its own channels before the
    activation, ``relu(g - (mean(g) + 1.64 * std(g)))`` (``"statistic"``), or at its first channel (``"first"``:
    no statistic, the channel order matters)."""

    def __init__(self, variant):
        super().__init__()
        self.variant = variant

    def forward(self, x):
        x = self.attention(x)
        y = self.ffn_norm(x)
        g = self.w1(y)
        if self.variant == "statistic":
            cut = g.mean(-1, keepdim=True) + g.std(-1, keepdim=True, unbiased=False) * torch.tensor(1.64)
        else:
            cut = g[..., :1]
        return x + self.w2(F.gelu(F.relu(g - cut), approximate="tanh") * self.w3(y))


def test_gate_thresholded_by_a_statistic_of_its_channels():
    """A statistic over every channel is the same in any channel order: the FFN is found and its channels are
    permuted like any other; a threshold taken from one channel is no statistic: that FFN is left out, exactly."""
    model, x = _decoder(lambda: _ThresholdedFFN("statistic")), _tokens()
    structure = _exact_s2ft(model, x)
    for i, block in enumerate(structure.blocks):
        f = block.ffn
        assert (f.gate.path, f.up.path, f.down.path, f.channels, f.fixed_order) == (
            f"blocks.{i}.w1", f"blocks.{i}.w3", f"blocks.{i}.w2", 80, "")
        assert f.activation == "gelu_tanh of a thresholded gate"
    plan = fxsparse.transform(model, "s2ft", example_inputs=x, ratios={"down": 0.25})._fxsparse_s2ft
    assert any(getattr(p, "channels", None) is not None for p in plan.perms.values())

    model = _decoder(lambda: _ThresholdedFFN("first"))
    structure = _exact_s2ft(model, x)
    assert all(b.ffn is None and _heads(b) == (6, 2, 8) for b in structure.blocks)
    assert {"blocks.0.w1", "blocks.0.w2", "blocks.0.w3"} <= set(structure.unrecognized)


def test_bitnet_sub_norm_ffn():
    """transformers' BitNet: an RMSNorm over the FFN's channels before down_proj."""
    model = _hf("BitNetConfig")
    structure = _exact_s2ft(model, x=torch.randint(0, 96, (1, 7)))
    assert all(b.ffn.channels == 80 and "over every channel" in b.ffn.fixed_order for b in structure.blocks)
    assert all(_heads(b) == (6, 2, 8) for b in structure.blocks)


def test_differential_attention_left_out_with_a_reason():
    """Differential attention (DiffLlama): two attention maps subtracted, no single linear takes the output of
    one; the attention stays dense with the reason."""
    model = _hf("DiffLlamaConfig")
    structure = _exact_s2ft(model, x=torch.randint(0, 96, (1, 7)))
    assert all(b.attention is None and b.ffn.channels == 80 for b in structure.blocks)
    assert "no linear takes the output of attention" in structure.reasons["model.layers.0.self_attn.q_proj"]


def test_multi_head_latent_attention():
    """DeepSeek-V3's MLA: q heads from the low-rank q_b_proj hold a no-rotary and a rotary part (12 rows each),
    the key is assembled in place from kv_b_proj's per-head part (8 rows) and a rotary part shared by every
    head (from kv_a_proj_with_mqa, left alone), values and o have 8 per head. Heads are permuted exactly."""
    model = _hf("DeepseekV3Config", q_lora_rank=16, kv_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=8,
                v_head_dim=8, head_dim=4, num_key_value_heads=6, n_routed_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=24, first_k_dense_replace=1, n_group=1, topk_group=1)
    structure = _exact_s2ft(model, x=torch.randint(0, 96, (1, 7)))
    assert [b.ffn.channels for b in structure.blocks] == [80, 24]  # dense layer, then the shared expert
    for i, block in enumerate(structure.blocks):
        a = block.attention
        assert _heads(block) == (6, 6, 12) and dict(a.role_dims) == {"k": 8, "v": 8, "o": 8}
        assert (a.q.path, a.k.path, a.v.path) == tuple(f"model.layers.{i}.self_attn.{name}" for name in (
            "q_b_proj", "kv_b_proj", "kv_b_proj"))
        assert a.k.index[:8] == tuple(range(8)) and a.v.index[:8] == tuple(range(8, 16))  # per head: k | v
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa" in structure.unrecognized


def test_sliding_window_layer_types():
    model = _hf("Gemma3TextConfig", num_attention_heads=4, head_dim=16, sliding_window=4,
                layer_types=["sliding_attention", "full_attention"])
    structure = _exact_s2ft(model, x=torch.randint(0, 96, (1, 7)))
    assert [_heads(b) for b in structure.blocks] == [(4, 2, 16)] * 2


def test_attention_over_flattened_heads_and_per_head_qk_layernorm():
    """XGLM (eager): ``bmm`` over (batch*heads, seq, head_dim); Persimmon: q/k LayerNorm over head_dim, shared
    by every head. Both are permuted exactly."""
    import transformers
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    xglm = AutoModelForCausalLM.from_config(transformers.XGLMConfig(
        vocab_size=96, d_model=48, ffn_dim=80, num_layers=2, attention_heads=6, max_position_embeddings=64),
        attn_implementation="eager").eval()
    persimmon = _hf("PersimmonConfig", num_key_value_heads=6, qk_layernorm=True)
    for model in (xglm, persimmon):
        structure = _exact_s2ft(model, x=torch.randint(0, 96, (1, 7)))
        assert [_heads(b) for b in structure.blocks] == [(6, 6, 8)] * 2
        assert [b.ffn.channels for b in structure.blocks] == [80] * 2
