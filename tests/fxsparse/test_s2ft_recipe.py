"""fxsparse.transform(recipe="s2ft") end to end: exactness, gradients, training, merge, determinism."""

import copy

import pytest
import torch

import fxsparse
from fxsparse.layers.s2ft import S2FTLinear
from fxsparse.models import tiny_model

ARCHS = ["llama", "qwen3", "gemma", "phi3", "gpt_neox", "gpt2"]


def _ids(seed=0, shape=(2, 12)):
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _ratios(model):
    return {"o": 0.34, "v": 0.5, "down": 0.1} if model.config.model_type not in ("phi3",) else {
        "o": 0.34, "q": 0.2, "up": 0.1}


@pytest.mark.parametrize("arch", ARCHS)
def test_transform_preserves_function_and_freezes_the_rest(arch):
    model = tiny_model(arch)
    x = _ids()
    with torch.no_grad():
        before = model(x).logits
    out = fxsparse.transform(model, "s2ft", ratios=_ratios(model), seed=0)
    assert out is model
    with torch.no_grad():
        assert _rel(model(x).logits, before) < 1e-6
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
    assert type(merged.model.layers[0].mlp).__name__ == "LlamaMLP"  # the fused FFN is undone too
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
    with torch.no_grad():
        trained = model(x).logits
    fxsparse.merge(model).save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert _rel(reloaded(x).logits, trained) < 1e-6


def test_transform_is_deterministic_and_resumes_from_state_dict():
    a = fxsparse.transform(tiny_model("mistral"), "s2ft", ratios={"o": 0.34, "v": 0.34, "down": 0.1}, seed=4)
    b = fxsparse.transform(tiny_model("mistral"), "s2ft", ratios={"o": 0.34, "v": 0.34, "down": 0.1}, seed=4)
    assert a._fxsparse_s2ft.plan == b._fxsparse_s2ft.plan
    with torch.no_grad():
        for p in fxsparse.trainable_parameters(a):
            p.mul_(1.5)
    b.load_state_dict(a.state_dict())
    x = _ids(5)
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)
    c = fxsparse.transform(tiny_model("mistral"), "s2ft", ratios={"o": 0.34, "v": 0.34, "down": 0.1}, seed=5)
    assert c._fxsparse_s2ft.plan != a._fxsparse_s2ft.plan


def test_verify_option_checks_every_pass():
    model = fxsparse.transform(tiny_model("llama"), "s2ft", ratios={"o": 0.5}, verify=True)
    assert model._fxsparse_recipe == "s2ft"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ratios": {"o": 1.5}}, "'o'"),
        ({"ratios": {"o": -0.1}}, "'o'"),
        ({"ratios": {"attn": 0.1}}, "'attn'"),
        ({"select": "magic"}, "'magic'"),
        ({"select": "gradient"}, "calibration"),
        ({"rank": 4}, "'rank'"),
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


def test_gradient_criterion_end_to_end():
    x = _ids(6)
    model = fxsparse.transform(tiny_model("llama"), "s2ft", ratios={"o": 0.34, "down": 0.1}, select="gradient",
                               calibration=[{"input_ids": x, "labels": x}])
    assert model._fxsparse_s2ft.plan.select == "gradient"
    assert fxsparse.trainable_parameters(model)


def test_smollm2_transform_is_exact_and_tiny(smollm2_copy):
    model = smollm2_copy
    x = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x).logits
    fxsparse.transform(model, "s2ft", seed=0)  # the paper's default ratios: o 5.2%, down 2%
    with torch.no_grad():
        after = model(x).logits
    assert _rel(after, before) < 1e-6
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
