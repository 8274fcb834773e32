"""fxsparse.transform(recipe="s2ft") end to end: exactness, the function check and rollback, gradients,
training, merge, determinism, recipes keyed by config, per-head operands, small and one-token examples."""

import copy
import dataclasses
import gc
import weakref

import pytest
import torch
from torch import nn

import fxsparse
import fxsparse.passes.find_structure as find_structure_module
from fxsparse.layers.s2ft import S2FTLinear
from fxsparse.models import tiny_model
from fxsparse.passes.manager import PassError, PassResult, fxpass
from fxsparse.recipes import get_recipe
from fxsparse.recipes.s2ft import S2FTConfig

ARCHS = ["llama", "qwen3", "gemma", "phi3", "gpt_neox", "gpt2"]
# Logits of the 2-block tiny models after S2FT vs before, per dtype. Measured worst (norm-relative, 7 families
# x 3 seeds): float32 2.3e-7, float16 8.5e-4, bfloat16 6.8e-3; S2FT in float64 is exact to rounding.
TOLERANCE = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 4e-2, "atol": 4e-2},
}


def _ids(seed=0, shape=(2, 12)):
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


def _ratios(model):
    return {"o": 0.34, "v": 0.5, "down": 0.1} if model.config.model_type not in ("phi3",) else {
        "o": 0.34, "q": 0.2, "up": 0.1}


def _logits(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("arch", ARCHS)
def test_transform_preserves_function_and_freezes_the_rest(arch):
    model = tiny_model(arch)
    x = _ids()
    before = _logits(model, x)
    out = fxsparse.transform(model, "s2ft", ratios=_ratios(model), seed=0)
    assert out is model
    torch.testing.assert_close(_logits(model, x), before, **TOLERANCE[torch.float32])
    trainable = {id(p) for p in fxsparse.trainable_parameters(model)}
    blocks = {id(m.block) for m in model.modules() if isinstance(m, S2FTLinear)}
    assert trainable == blocks and blocks
    assert all(not p.requires_grad for n, p in model.named_parameters() if id(p) not in blocks)


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2"])
def test_block_gradients_equal_dense_gradients_float64(arch):
    """The block's gradient is the dense model's weight gradient at the selected rows/columns."""
    dense = tiny_model(arch).double()
    sparse = copy.deepcopy(dense)
    fxsparse.transform(sparse, "s2ft", ratios=_ratios(dense), seed=1)
    x = _ids(1)
    dense(x, labels=x).loss.backward()
    sparse(x, labels=x).loss.backward()
    state = sparse._fxsparse_s2ft
    for path, (dim, _rows, origin) in state.replaced.items():
        grad = dense.get_submodule(path).weight.grad
        if type(dense.get_submodule(path)).__name__ == "Conv1D":
            grad = grad.t()
        expected = grad.index_select(dim, torch.tensor(origin))
        torch.testing.assert_close(sparse.get_submodule(path).block.grad, expected, rtol=1e-10, atol=1e-12)


def test_training_then_merge_changes_only_selected_units():
    model = tiny_model("llama")
    original = copy.deepcopy(model.state_dict())
    fxsparse.transform(model, "s2ft", ratios={"o": 0.34, "down": 0.1}, seed=2)
    state = model._fxsparse_s2ft
    optimizer = torch.optim.AdamW(fxsparse.trainable_parameters(model), lr=1e-2)
    for step in range(3):
        x = _ids(10 + step)
        model(x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    merged = fxsparse.merge(model)
    assert type(merged).__name__ == "LlamaForCausalLM" and not hasattr(merged, "_fxsparse_s2ft")
    assert all(type(m).__name__ != "S2FTLinear" for m in merged.modules())
    assert type(merged.model.layers[0].mlp).__name__ == "LlamaMLP"  # the recomputing FFN is undone too
    merged_sd = merged.state_dict()
    assert list(merged_sd) == list(original)
    selected = {}
    for block, roles in state.plan.units.items():
        for role, units in roles.items():
            path = state.structure.blocks[block].projections()[role].path + ".weight"
            size = state.structure.blocks[block].attention.head_dim if role == "o" else 1
            selected[path] = sorted(u * size + d for u in units for d in range(size))
    for key, value in original.items():
        assert merged_sd[key].shape == value.shape
        if key not in selected:
            assert torch.equal(merged_sd[key], value), key
            continue
        changed = (merged_sd[key] != value).any(dim=0).nonzero().flatten().tolist()  # changed columns
        assert changed == selected[key], key
    assert all(p.requires_grad for p in merged.parameters())


def test_merged_model_saves_and_loads_in_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("qwen2")
    fxsparse.transform(model, "s2ft", ratios={"o": 0.5, "down": 0.2})
    with torch.no_grad():
        for p in fxsparse.trainable_parameters(model):
            p.add_(torch.randn_like(p))
    x = _ids(3)
    trained = _logits(model, x)
    fxsparse.merge(model).save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(reloaded, x), trained, **TOLERANCE[torch.float32])


def test_transform_is_deterministic_and_resumes_from_state_dict():
    a = fxsparse.transform(tiny_model("mistral"), "s2ft", ratios={"o": 0.34, "v": 0.34, "down": 0.1}, seed=4)
    b = fxsparse.transform(tiny_model("mistral"), "s2ft", ratios={"o": 0.34, "v": 0.34, "down": 0.1}, seed=4)
    assert a._fxsparse_s2ft.plan == b._fxsparse_s2ft.plan
    with torch.no_grad():
        for p in fxsparse.trainable_parameters(a):
            p.mul_(1.5)
    b.load_state_dict(a.state_dict())
    x = _ids(5)
    assert torch.equal(_logits(a, x), _logits(b, x))
    c = fxsparse.transform(tiny_model("mistral"), "s2ft", ratios={"o": 0.34, "v": 0.34, "down": 0.1}, seed=5)
    assert c._fxsparse_s2ft.plan != a._fxsparse_s2ft.plan


# ---------------------------------------------------------------- the function check and rollback


@fxpass(reads=("model", "replaced"), writes=("model",))
def _scale_first_block(model, replaced):
    """Break the function: triple the trainable block of the first replaced projection."""
    with torch.no_grad():
        model.get_submodule(next(iter(replaced))).block.mul_(3.0)
    return PassResult(True, outputs={"model": model})


def _with_corruption():
    """The s2ft recipe with a pass that breaks the function inserted before the check."""
    s2ft = get_recipe("s2ft")
    return dataclasses.replace(s2ft, name="s2ft-broken", passes=(*s2ft.passes[:-1], _scale_first_block,
                                                                s2ft.passes[-1]))


def _everything(model):
    """All a transform may touch: module types, parameter objects, values, flags, attributes."""
    return ([(name, type(m)) for name, m in model.named_modules()],
            {name: (p, p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()},
            {name: b.clone() for name, b in model.named_buffers()},
            sorted(vars(model)), model.training)


def _assert_unchanged(model, before):
    modules, params, buffers, attributes, training = before
    assert [(name, type(m)) for name, m in model.named_modules()] == modules
    assert list(dict(model.named_parameters())) == list(params)
    for name, p in model.named_parameters():
        obj, value, flag = params[name]
        assert p is obj and p.requires_grad == flag and torch.equal(p, value), name
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name
    assert sorted(vars(model)) == attributes and model.training == training


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_changed_function_is_caught_named_and_rolled_back(dtype):
    model = tiny_model("llama").to(dtype).train()
    model.model.embed_tokens.weight.requires_grad_(False)  # a flag pattern transform must restore
    before = _everything(model)
    with pytest.raises(PassError, match="check_function") as info:
        fxsparse.transform(model, _with_corruption(), ratios={"o": 0.34, "down": 0.1}, seed=0)
    corrupted = next(iter(fxsparse.transform(tiny_model("llama").to(dtype), "s2ft", ratios={"o": 0.34, "down": 0.1},
                                             seed=0)._fxsparse_s2ft.replaced))
    message = str(info.value)
    assert f"output of {corrupted} differs" in message and str(dtype) in message
    assert message.count("differs by") == 1  # the other units were checked on their own inputs: exact
    _assert_unchanged(model, before)
    fxsparse.transform(model, "s2ft", ratios={"o": 0.34, "down": 0.1}, seed=0)  # and it can be transformed again


def test_verify_off_lets_the_same_change_through():
    model = tiny_model("llama")
    x = _ids(7)
    before = _logits(model, x)
    fxsparse.transform(model, _with_corruption(), ratios={"o": 0.34, "down": 0.1}, seed=0, verify=False)
    assert (_logits(model, x) - before).abs().max() > 1e-2


def test_bfloat16_model_transforms_with_verify_on_by_default():
    assert S2FTConfig().verify is True
    model = tiny_model("llama").to(torch.bfloat16)
    x = _ids(8)
    before = _logits(model, x)
    fxsparse.transform(model, "s2ft", ratios={"o": 0.34, "v": 0.5, "gate": 0.1, "down": 0.1}, seed=3)
    torch.testing.assert_close(_logits(model, x), before, **TOLERANCE[torch.bfloat16])


def test_a_plan_for_another_model_is_a_value_error_and_changes_nothing():
    plan = fxsparse.transform(tiny_model("llama"), "s2ft", ratios={"o": 0.34}, seed=0)._fxsparse_s2ft.plan
    model = tiny_model("mistral")  # 3 KV heads, not 2
    before = _everything(model)
    with pytest.raises(ValueError, match="plan was made for another architecture.*num_kv_heads"):
        fxsparse.transform(model, "s2ft", plan=plan)
    _assert_unchanged(model, before)


class _HeadGainModel(nn.Module):
    """Two hand-written blocks; block 0 multiplies each query head by its own learned gain, outside the
    linears (so permuting heads without the gain would change the function)."""

    def __init__(self, dim=32, heads=4, hidden=40):
        super().__init__()
        self.heads = heads
        self.layers = nn.ModuleList(nn.ModuleDict({
            "norm": nn.LayerNorm(dim), "q": nn.Linear(dim, dim), "k": nn.Linear(dim, dim), "v": nn.Linear(dim, dim),
            "o": nn.Linear(dim, dim), "up": nn.Linear(dim, hidden), "down": nn.Linear(hidden, dim)}) for _ in range(2))
        self.head_gain = nn.Parameter(torch.linspace(0.25, 4.0, heads))

    def forward(self, x):
        b, s, d = x.shape
        for i, layer in enumerate(self.layers):
            h = layer["norm"](x)
            q, k, v = (layer[n](h).view(b, s, self.heads, -1).transpose(1, 2) for n in ("q", "k", "v"))
            if i == 0:
                q = q * self.head_gain.view(1, -1, 1, 1)
            a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + layer["o"](a.transpose(1, 2).reshape(b, s, d))
            x = x + layer["down"](nn.functional.gelu(layer["up"](layer["norm"](x))))
        return x


def test_a_per_head_gain_stops_that_head_permutation_and_stays_exact():
    torch.manual_seed(0)
    model = _HeadGainModel()
    x = torch.randn(2, 6, 32)
    before = _logits(model, x)
    structure = fxsparse.inspect(model, x)
    assert "head_gain" in structure.blocks[0].attention.fixed_order and not structure.blocks[1].attention.fixed_order
    assert "layers.0.o" not in structure.unrecognized
    fxsparse.transform(model, "s2ft", example_inputs=x, ratios={"o": 0.5, "q": 0.5, "down": 0.2}, seed=0)
    torch.testing.assert_close(_logits(model, x), before, **TOLERANCE[torch.float32])
    state = model._fxsparse_s2ft
    assert state.plan.count("o") == 4 and "o" in state.plan.units[0]  # block 0 is selected from too
    assert getattr(state.perms.get(0), "heads", None) is None and getattr(state.perms.get(0), "kv_heads", None) is None
    for name in ("q", "o"):  # block 0's heads are trained where they are
        layer = model.layers[0][name]
        assert type(layer).__name__ != "S2FTLinear" or layer.index.tolist() == layer.origin.tolist()


def test_without_the_discovery_check_the_function_check_catches_the_head_gain(monkeypatch):
    """The two safety nets are independent: with the per-head check of discovery switched off, the head
    permutation of block 0 changes the function (as it silently did before) and the function check names
    that attention and rolls the model back."""
    monkeypatch.setattr(find_structure_module, "_head_blocker", lambda *args: None)
    options = {"ratios": {"o": 0.5, "q": 0.5}, "seed": 1}
    torch.manual_seed(0)
    x = torch.randn(2, 6, 32)
    unchecked = _HeadGainModel()
    before = _logits(unchecked, x)
    fxsparse.transform(unchecked, "s2ft", example_inputs=x, verify=False, **options)
    assert ((_logits(unchecked, x) - before).norm() / before.norm()) > 1e-3
    torch.manual_seed(0)
    model = _HeadGainModel()
    state = _everything(model)
    with pytest.raises(PassError, match=r"attention of block 0 \(q layers.0.q, k layers.0.k, v layers.0.v, o "
                                        r"layers.0.o\): output of layers.0.o differs"):
        fxsparse.transform(model, "s2ft", example_inputs=x, **options)
    _assert_unchanged(model, state)


def test_one_token_example_input():
    model = tiny_model("llama")
    x = _ids(9)
    before = _logits(model, x)
    fxsparse.transform(model, "s2ft", example_inputs=torch.tensor([[7]]), ratios={"o": 0.34, "down": 0.1})
    assert model._fxsparse_s2ft.plan.count("o") == 4  # attention was found from one token
    torch.testing.assert_close(_logits(model, x), before, **TOLERANCE[torch.float32])


# ---------------------------------------------------------------- recipes keyed by config


def test_transform_takes_the_config_itself():
    config = S2FTConfig(ratios={"o": 0.34, "down": 0.1}, seed=6)
    by_config = fxsparse.transform(tiny_model("llama"), config)
    by_name = fxsparse.transform(tiny_model("llama"), "s2ft", ratios={"o": 0.34, "down": 0.1}, seed=6)
    assert by_config._fxsparse_recipe == "s2ft" and by_config._fxsparse_s2ft.plan == by_name._fxsparse_s2ft.plan
    overridden = fxsparse.transform(tiny_model("llama"), config, seed=7)
    assert overridden._fxsparse_s2ft.plan.seed == 7
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['rank'\] for S2FTConfig"):
        fxsparse.transform(tiny_model("llama"), config, rank=4)

    @dataclasses.dataclass(frozen=True)
    class UnknownConfig:
        ratio: float = 0.1

    with pytest.raises(ValueError, match="no recipe takes a UnknownConfig"):
        fxsparse.transform(tiny_model("llama"), UnknownConfig())


# ---------------------------------------------------------------- options, criteria, state


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ratios": {"o": 1.5}}, "'o'"),
        ({"ratios": {"o": -0.1}}, "'o'"),
        ({"ratios": {"attn": 0.1}}, "'attn'"),
        ({"select": "magic"}, "'magic'"),
        ({"select": "gradient"}, "calibration"),
        ({"rank": 4}, "'rank'"),
        ({"verify": "yes"}, "verify"),
    ],
)
def test_bad_options_raise_value_error_naming_them(options, message):
    with pytest.raises(ValueError, match=message):
        fxsparse.transform(tiny_model("llama"), "s2ft", **options)


def test_unknown_recipe_and_double_transform():
    with pytest.raises(ValueError, match="'lora'"):
        fxsparse.transform(tiny_model("llama"), "lora")
    model = fxsparse.transform(tiny_model("llama"), "s2ft")
    with pytest.raises(ValueError, match="already transformed"):
        fxsparse.transform(model, "s2ft")
    with pytest.raises(ValueError, match="not transformed"):
        fxsparse.merge(tiny_model("llama"))


def test_gradient_criterion_picks_the_largest_gradients_and_keeps_no_batch():
    """The selected o heads are the three with the largest gradient norm of a dense backward on the
    calibration batch; after transform nothing holds on to that batch."""
    base = tiny_model("llama")
    x = _ids(6)
    dense = copy.deepcopy(base)
    dense(input_ids=x, labels=x).loss.backward()
    norms = {(b, h): dense.model.layers[b].self_attn.o_proj.weight.grad[:, 8 * h:8 * (h + 1)].norm().item()
             for b in range(2) for h in range(6)}
    expected = sorted(norms, key=lambda key: (-norms[key], key))[:4]
    calibration = [{"input_ids": x.clone(), "labels": x.clone()}]
    watch = weakref.ref(calibration[0]["input_ids"])
    model = fxsparse.transform(base, "s2ft", ratios={"o": 0.34}, select="gradient", calibration=calibration)
    plan = model._fxsparse_s2ft.plan
    assert sorted((b, h) for b, roles in plan.units.items() for h in roles.get("o", [])) == sorted(expected)
    del calibration
    gc.collect()
    assert watch() is None


def test_state_keeps_the_selection_not_the_inputs():
    model = fxsparse.transform(tiny_model("llama"), "s2ft", example_inputs=_ids(1, (4, 40)), ratios={"o": 0.34})
    fields = {f.name for f in dataclasses.fields(model._fxsparse_s2ft)}
    assert fields == {"structure", "plan", "perms", "replaced", "recomputed", "requires_grad", "base_blocks"}


def test_smollm2_transform_is_exact_and_tiny(smollm2_copy):
    model = smollm2_copy
    x = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    before = _logits(model, x)
    fxsparse.transform(model, "s2ft", seed=0)  # the paper's default ratios: o 5.2%, down 2%; verify on
    # 30 blocks deep: measured max error 5.5e-6 of the largest logit (float32)
    torch.testing.assert_close(_logits(model, x), before, rtol=1e-4, atol=1e-4 * before.abs().max().item())
    trainable = sum(p.numel() for p in fxsparse.trainable_parameters(model))
    # 14 of 270 query heads (64 x 576 each) and 922 of 46080 channels (576 each)
    assert trainable == 14 * 64 * 576 + 922 * 576


def test_print_trainable_parameters_counts_the_model_once(capsys):
    model = tiny_model("llama")
    total = sum(p.numel() for p in model.parameters())
    fxsparse.transform(model, "s2ft", ratios={"o": 0.5, "down": 0.25})
    line = fxsparse.print_trainable_parameters(model)
    trainable = sum(p.numel() for p in fxsparse.trainable_parameters(model))
    assert line == (f"trainable params: {trainable:,} || all params: {total:,} || "
                    f"trainable%: {100 * trainable / total:.4f}")
    assert capsys.readouterr().out.strip() == line
