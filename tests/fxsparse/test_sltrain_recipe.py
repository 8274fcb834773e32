"""The sltrain / lowrank recipes on tiny models: targets, defaults, validation, merge, resume."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import fxsparse
import fxsparse.recipes as recipes
from fxsparse.layers.sltrain import SLTrainLinear
from fxsparse.models import tiny_model
from fxsparse.passes.manager import PassResult, fxpass
from fxsparse.recipes import get_recipe
from fxsparse.recipes.sltrain import LowRankConfig, SLTrainConfig, default_alpha, default_rank

LLAMA_ROLES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


_STRUCTURES: dict = {}


@fxpass(reads=("model", "example_inputs"), writes=("structure",))
def _cached_structure(model, example_inputs):
    """capture_graph + find_structure, once per model configuration."""
    key = (type(model).__name__, model.config.to_json_string())
    if key not in _STRUCTURES:
        _STRUCTURES[key] = fxsparse.inspect(model, example_inputs)
    return PassResult(False, outputs={"structure": _STRUCTURES[key]})


@pytest.fixture(autouse=True)
def _structure_once_per_architecture(monkeypatch):
    """Structure discovery (a torch.export capture) is tested elsewhere: here the recipes start from a cached
    result per model configuration, put in place of their first two passes (a recipe is plain data)."""
    for name in ("sltrain", "lowrank"):
        recipe = get_recipe(name)
        fast = dataclasses.replace(recipe, passes=(_cached_structure, *recipe.passes[2:]))
        monkeypatch.setitem(recipes._BY_NAME, name, fast)
        monkeypatch.setitem(recipes._BY_CONFIG, recipe.config_cls, fast)


def _sltrain_layers(model: nn.Module) -> dict[str, SLTrainLinear]:
    return {path: m for path, m in model.named_modules() if isinstance(m, SLTrainLinear)}


def _ids(vocab: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randint(vocab, (2, 9), generator=torch.Generator().manual_seed(seed))


def _perturb(model: nn.Module, seed: int) -> None:
    """B is zero right after transform; random B and bias make the low-rank path and merge non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in _sltrain_layers(model).values():
            layer.B.copy_(0.05 * torch.randn(layer.B.shape, generator=gen, dtype=layer.B.dtype))
            if layer.bias is not None:
                layer.bias.copy_(0.05 * torch.randn(layer.bias.shape, generator=gen, dtype=layer.bias.dtype))


def test_default_targets_are_every_projection_and_nothing_else():
    model = fxsparse.transform(tiny_model("llama"), recipe="sltrain", rank=8)
    expected = {f"model.layers.{i}.{role}" for i in range(2) for role in LLAMA_ROLES}
    assert set(_sltrain_layers(model)) == expected
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens, nn.Embedding)
    assert all(p.requires_grad for p in model.parameters())  # embeddings, norms and head train densely
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model(_ids()).logits.shape == (2, 9, 96)


def test_parameter_counts_per_layer():
    model = fxsparse.transform(tiny_model("llama"), recipe="sltrain", rank=8, sparsity=0.05)
    for layer in _sltrain_layers(model).values():
        d_in, d_out = layer.in_features, layer.out_features
        nnz = round(0.05 * d_in * d_out)
        assert layer.nnz == nnz
        assert sum(p.numel() for p in layer.parameters()) == 8 * (d_in + d_out) + nnz  # LLaMA: no bias


def test_default_rank_and_alpha_follow_the_width_rule():
    assert (default_rank(512), default_rank(1024), default_rank(2048)) == (128, 256, 512)
    assert (default_alpha(512), default_alpha(1024)) == (32.0, 16.0)
    model = fxsparse.transform(tiny_model("llama"), recipe="sltrain")
    layer = model.model.layers[0].self_attn.q_proj
    assert (layer.rank, layer.alpha, layer.sparsity, layer.support) == (48 // 4, 32.0, 0.03, "random")


def test_targets_by_role_and_by_path():
    model = fxsparse.transform(tiny_model("llama"), recipe="sltrain", rank=4, targets=["q", "down"])
    assert set(_sltrain_layers(model)) == {f"model.layers.{i}.{r}" for i in range(2)
                                           for r in ("self_attn.q_proj", "mlp.down_proj")}
    path = "model.layers.1.mlp.up_proj"
    model = fxsparse.transform(tiny_model("llama"), recipe="sltrain", rank=4, targets=[path])
    assert set(_sltrain_layers(model)) == {path}


@pytest.mark.parametrize(
    "targets,match",
    [
        (["qq"], "'qq'"),
        (["lm_head"], "'lm_head'"),
        (["model.embed_tokens"], "'model.embed_tokens'"),
        ([], "targets"),
    ],
)
def test_bad_targets_raise(targets, match):
    with pytest.raises(ValueError, match=match):
        fxsparse.transform(tiny_model("llama"), recipe="sltrain", rank=4, targets=targets)


def test_fused_projection_is_replaced_whole_or_refused():
    model = fxsparse.transform(tiny_model("phi3"), recipe="sltrain", rank=4)
    layers = _sltrain_layers(model)
    assert {"model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj"} <= set(layers)
    assert layers["model.layers.0.self_attn.qkv_proj"].out_features == 48 + 2 * 16
    with pytest.raises(ValueError, match="qkv_proj"):
        fxsparse.transform(tiny_model("phi3"), recipe="sltrain", rank=4, targets=["q"])
    model = fxsparse.transform(tiny_model("phi3"), recipe="sltrain", rank=4, targets=["q", "k", "v"])
    assert set(_sltrain_layers(model)) == {f"model.layers.{i}.self_attn.qkv_proj" for i in range(2)}


@pytest.mark.parametrize(
    "options,match",
    [
        ({"rank": 0}, "rank=0"),
        ({"rank": -1}, "rank=-1"),
        ({"rank": 16}, "rank=16"),  # k_proj is 48 -> 16: rank must stay below min(in, out)
        ({"sparsity": 0.0}, "sparsity=0.0"),
        ({"sparsity": 1.0}, "sparsity=1.0"),
        ({"sparsity": 1.5}, "sparsity=1.5"),
        ({"support": "dense"}, "'dense'"),
        ({"block_size": 0}, "block_size=0"),
        ({"alpha": -2.0}, "alpha=-2.0"),
        ({"rank": 4, "support": "block", "block_size": 32}, "block_size=32"),
        ({"ranks": 4}, "ranks"),
    ],
)
def test_bad_options_raise_value_error_naming_them(options, match):
    with pytest.raises(ValueError, match=match):
        fxsparse.transform(tiny_model("llama"), recipe="sltrain", **options)


def test_config_is_frozen_and_normalises_targets():
    config = SLTrainConfig(rank=8, targets=["q", "v"])
    assert config.targets == ("q", "v")
    with pytest.raises(AttributeError):
        config.rank = 4
    assert LowRankConfig(rank=4).targets is None


@pytest.mark.parametrize(
    "arch,support", [("llama", "random"), ("llama", "block"), ("gpt2", "block"), ("opt", "random")]
)
def test_merge_is_exact_and_loads_in_plain_transformers(arch, support, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(arch).double()
    fxsparse.transform(model, recipe="sltrain", rank=4, sparsity=0.05, support=support, block_size=8)
    _perturb(model, seed=1)
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    merged = fxsparse.merge(model)
    assert not _sltrain_layers(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, before)
    if arch == "gpt2":
        assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, before)


def _train_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    for step in range(steps):
        ids = _ids(seed=seed * 100 + step)
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()


@pytest.mark.parametrize("recipe,options", [("sltrain", {"support": "random"}), ("sltrain", {"support": "block",
                                            "block_size": 8}), ("lowrank", {})])
def test_resume_is_exact(recipe, options):
    model = fxsparse.transform(tiny_model("llama"), recipe=recipe, rank=4, seed=3, **options).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train_steps(model, opt, steps=2, seed=0)

    resumed = fxsparse.transform(tiny_model("llama"), recipe=recipe, rank=4, seed=3, **options).train()
    resumed.load_state_dict(model.state_dict())
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # a copy: the optimizers must not share moments
    _train_steps(model, opt, steps=2, seed=1)
    _train_steps(resumed, opt2, steps=2, seed=1)
    for key, value in model.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_transform_is_deterministic_in_seed():
    a = fxsparse.transform(tiny_model("llama"), recipe="sltrain", rank=4, seed=5)
    b = fxsparse.transform(tiny_model("llama"), recipe="sltrain", rank=4, seed=5)
    c = fxsparse.transform(tiny_model("llama"), recipe="sltrain", rank=4, seed=6)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.equal(a.state_dict()["model.layers.0.mlp.up_proj.support_col"],
                           c.state_dict()["model.layers.0.mlp.up_proj.support_col"])
    # each layer draws its own support: two same-shaped layers differ
    q0, q1 = a.model.layers[0].self_attn.q_proj, a.model.layers[1].self_attn.q_proj
    assert not torch.equal(q0.support_col, q1.support_col)


def test_lowrank_recipe_has_no_sparse_part():
    model = fxsparse.transform(tiny_model("opt"), recipe="lowrank", rank=4)
    layers = _sltrain_layers(model)
    assert layers and all(layer.nnz == 0 for layer in layers.values())
    for layer in layers.values():
        assert sum(p.numel() for p in layer.parameters()) == 4 * (layer.in_features + layer.out_features) + (
            layer.out_features  # OPT projections keep their bias
        )
    assert get_recipe("lowrank").config_cls is LowRankConfig
    with pytest.raises(ValueError, match="sparsity"):
        fxsparse.transform(tiny_model("opt"), recipe="lowrank", rank=4, sparsity=0.1)


def test_trained_model_gradients_reach_every_parameter():
    model = fxsparse.transform(tiny_model("gpt2"), recipe="sltrain", rank=4).train()
    _perturb(model, seed=2)
    ids = _ids()
    model(ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing


def test_lowrank_from_scratch_is_not_a_dead_start():
    """B = 0 with no sparse part would zero every block's output and gradient; lowrank draws B at random."""
    from fxsparse.layers.sltrain import SLTrainLinear

    model = fxsparse.transform(tiny_model("llama"), "lowrank", rank=4, seed=0)
    x = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    model(x, labels=x).loss.backward()
    layers = [m for m in model.modules() if isinstance(m, SLTrainLinear)]
    assert layers and all(m.B.abs().sum() > 0 for m in layers)
    assert all(m.A.grad is not None and m.A.grad.abs().sum() > 0 for m in layers)
    again = fxsparse.transform(tiny_model("llama"), "lowrank", rank=4, seed=0)
    redrawn = [m for m in again.modules() if isinstance(m, SLTrainLinear)]
    assert all(torch.equal(a.B, b.B) for a, b in zip(layers, redrawn))


def test_configs_select_their_recipe():
    a = fxsparse.transform(tiny_model("llama"), SLTrainConfig(rank=4, seed=2))
    b = fxsparse.transform(tiny_model("llama"), "sltrain", rank=4, seed=2)
    assert a._fxsparse_recipe == "sltrain"
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    low = fxsparse.transform(tiny_model("llama"), LowRankConfig(rank=4))
    assert low._fxsparse_recipe == "lowrank" and all(m.nnz == 0 for m in _sltrain_layers(low).values())
    assert get_recipe(SLTrainConfig(rank=4)).name == "sltrain" and get_recipe(LowRankConfig).name == "lowrank"


def test_a_failure_half_way_leaves_the_model_as_it_was():
    """rank 16 fits q_proj (48 x 48) but not k_proj (48 -> 16): q_proj was already replaced when it fails."""
    model = tiny_model("llama")
    model.model.norm.weight.requires_grad_(False)
    modules = [(name, type(m)) for name, m in model.named_modules()]
    params = {name: (p, p.requires_grad) for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match="rank=16"):
        fxsparse.transform(model, "sltrain", rank=16)
    assert [(name, type(m)) for name, m in model.named_modules()] == modules
    assert {name: (p, p.requires_grad) for name, p in model.named_parameters()} == params
    assert not hasattr(model, "_fxsparse_recipe")
