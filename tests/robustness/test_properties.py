"""Property test over random small decoders (issue 13, acceptance): heads, KV heads, head size, FFN width,
gated or not, biases, depth. For every drawn model: S²FT transform → merge is exact (bit-exact without
training; with trained blocks the merged model computes what the transformed one did), SLTrain transform →
forward and backward run with a gradient on every trainable parameter, and a transform that fails at a
drawn point leaves the model exactly as it was."""

import dataclasses
import os

import pytest
import torch

import fxsparse
from fxsparse.passes.manager import PassError, fxpass
from fxsparse.recipes import apply_recipe, get_recipe, resolve_recipe

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

FAMILIES = ("llama", "qwen2", "gpt_neox")  # gated + separate q/k/v (two bias layouts), non-gated + fused qkv


@st.composite
def decoders(draw):
    family = draw(st.sampled_from(FAMILIES))
    if family == "gpt_neox":  # no GQA in GPT-NeoX
        kv_heads = heads = draw(st.integers(1, 4))
    else:
        kv_heads = draw(st.integers(1, 3))
        heads = kv_heads * draw(st.integers(1, 3))
    return {
        "family": family, "heads": heads, "kv_heads": kv_heads,
        "head_dim": draw(st.sampled_from([4, 6, 8])),  # even: rotary embeddings pair dimensions
        "ffn": draw(st.integers(3, 24)), "bias": draw(st.booleans()), "layers": draw(st.integers(1, 2)),
        "seed": draw(st.integers(0, 2**16)),
    }


def _build(spec, dtype=torch.float64):
    import transformers

    hidden = spec["heads"] * spec["head_dim"]
    common = dict(vocab_size=32, max_position_embeddings=32, hidden_size=hidden, intermediate_size=spec["ffn"],
                  num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"])
    if spec["family"] == "llama":
        config = transformers.LlamaConfig(**common, num_key_value_heads=spec["kv_heads"], head_dim=spec["head_dim"],
                                          attention_bias=spec["bias"], mlp_bias=spec["bias"])
    elif spec["family"] == "qwen2":  # q/k/v always carry a bias in Qwen2; o and the FFN never do
        config = transformers.Qwen2Config(**common, num_key_value_heads=spec["kv_heads"])
    else:
        config = transformers.GPTNeoXConfig(**common, attention_bias=spec["bias"])
        config.rotary_pct = 1.0
    config._attn_implementation = "sdpa"
    torch.manual_seed(spec["seed"])
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)  # non-zero biases, so a bias that follows the wrong row shows
    return model


def _ids(spec):
    return torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(spec["seed"]))


def _snapshot(model):
    return ([(n, id(m), type(m).__name__, m.training) for n, m in model.named_modules()],
            [(n, id(p), p.requires_grad) for n, p in model.named_parameters()],
            {k: v.clone() for k, v in model.state_dict().items()},
            [(n, {k: list(v) for k, v in vars(m).items() if k.endswith("hooks") and isinstance(v, dict)})
             for n, m in model.named_modules()],
            sorted(k for k in vars(model) if k.startswith("_fxsparse") or k == "save_pretrained"))


def _same(before, after):
    return (before[0] == after[0] and before[1] == after[1] and before[3] == after[3] and before[4] == after[4]
            and before[2].keys() == after[2].keys()
            and all(torch.equal(v, after[2][k]) for k, v in before[2].items()))


class Injected(RuntimeError):
    pass


@fxpass(reads=("model",), writes=())
def _fail(model):
    """Fails: a stand-in for any pass that raises."""
    raise Injected("injected failure")


# CI: 6 fixed examples per property (derandomized: the same models every run, about 25 s of CPU in all).
# FXSPARSE_PROPERTY_EXAMPLES=200 explores further with fresh random draws.
_EXPLORE = int(os.environ.get("FXSPARSE_PROPERTY_EXAMPLES", "0"))
SETTINGS = hypothesis.settings(max_examples=_EXPLORE or 6, deadline=None, derandomize=not _EXPLORE, print_blob=True,
                               database=None, suppress_health_check=list(hypothesis.HealthCheck))


@SETTINGS
@hypothesis.given(spec=decoders(), data=st.data())
def test_s2ft_transform_then_merge_is_exact(spec, data):
    model = _build(spec)
    gated = spec["family"] != "gpt_neox"
    roles = ["q", "k", "v", "o", "up", "down"] + (["gate"] if gated else [])
    chosen = data.draw(st.lists(st.sampled_from(roles), min_size=1, max_size=4, unique=True), label="roles")
    ratios = {role: data.draw(st.sampled_from([0.5, 1.0]), label=f"ratio {role}") for role in chosen}
    x = _ids(spec)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(x).logits
    fxsparse.transform(model, "s2ft", ratios=ratios, seed=spec["seed"])
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, rtol=0, atol=1e-10)
    untouched = fxsparse.merge(model)
    assert all(torch.equal(untouched.state_dict()[k], v) for k, v in original.items())  # bit-exact round trip

    fxsparse.transform(model, "s2ft", ratios=ratios, seed=spec["seed"])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in fxsparse.trainable_parameters(model):
            p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
        trained = model(x).logits
        merged = fxsparse.merge(model)(x).logits
    torch.testing.assert_close(merged, trained, rtol=0, atol=1e-10)
    assert not torch.equal(merged, before)  # the trained blocks are in the merged weights


@SETTINGS
@hypothesis.given(spec=decoders(), support=st.sampled_from(["random", "block"]))
def test_sltrain_forward_and_backward_run(spec, support):
    model = _build(spec, dtype=torch.float32)
    width = spec["heads"] * spec["head_dim"]
    block_size = 2 if support == "block" else 32
    options = dict(rank=max(1, min(width, spec["ffn"]) // 3), sparsity=0.3, support=support, block_size=block_size,
                   seed=spec["seed"])
    if options["rank"] >= min(width, spec["ffn"], spec["kv_heads"] * spec["head_dim"]):
        options["rank"] = 1
    fxsparse.transform(model, "sltrain", **options)
    x = _ids(spec)
    loss = model(x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


@SETTINGS
@hypothesis.given(spec=decoders(), recipe=st.sampled_from(["s2ft", "sltrain"]), data=st.data())
def test_a_failing_transform_leaves_the_model_unchanged(spec, recipe, data):
    model = _build(spec)
    handler = get_recipe(recipe)
    position = data.draw(st.integers(1, len(handler.passes)), label="fails after pass")
    failing = dataclasses.replace(handler, name=f"{recipe}-failing",
                                  passes=handler.passes[:position] + (_fail,) + handler.passes[position:])
    options = {"ratios": {"o": 0.5, "up": 0.5, "down": 0.5}} if recipe == "s2ft" else {"rank": 1, "block_size": 2}
    _, config = resolve_recipe(recipe, options)
    before = _snapshot(model)
    with pytest.raises((Injected, PassError), match="injected failure"):
        apply_recipe(model, failing, config)
    assert _same(before, _snapshot(model))
