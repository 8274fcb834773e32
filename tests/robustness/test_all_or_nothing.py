"""A failing transform leaves the model exactly as it was (issue 13, point 8): module objects and types,
parameter values and objects, ``requires_grad``, train/eval modes, every hook, and no fxsparse attribute —
wherever the failure happens: between any two passes, inside a pass halfway through its module swaps or
weight permutations, in the function check (``verify=True``), or in the recipe's finish."""

import dataclasses

import pytest
import torch
from torch import nn

import fxsparse
from fxsparse.models import tiny_model
from fxsparse.passes.manager import PassError, fxpass
from fxsparse.recipes import apply_recipe, get_recipe, resolve_recipe

OPTIONS = {"s2ft": {"ratios": {"q": 0.5, "v": 0.5, "o": 0.5, "up": 0.1, "down": 0.1}},
           "sltrain": {"rank": 4, "block_size": 8}, "lowrank": {"rank": 4}}


def _hooks(module):
    return {name: list(value.items()) for name, value in vars(module).items()
            if name.endswith("hooks") and isinstance(value, dict)}


def _snapshot(model):
    return {
        "modules": [(name, id(m), type(m).__name__, m.training) for name, m in model.named_modules()],
        "parameters": [(name, id(p), p.requires_grad) for name, p in model.named_parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "hooks": [(name, _hooks(m)) for name, m in model.named_modules()],
        "attributes": sorted(k for k in vars(model) if k.startswith("_fxsparse") or k == "save_pretrained"),
    }


def _assert_unchanged(model, before):
    after = _snapshot(model)
    for key in ("modules", "parameters", "hooks", "attributes"):
        assert after[key] == before[key], key
    assert after["state"].keys() == before["state"].keys()
    changed = [k for k, v in before["state"].items() if not torch.equal(after["state"][k], v)]
    assert not changed, changed


def _model():
    model = tiny_model("llama")
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(False)  # flags other than all-True come back too
    model.model.layers[0].eval()
    model.model.layers[0].mlp.register_forward_hook(_record_hook)  # a user's hook stays, no fxsparse hook stays
    return model


def _record_hook(module, args, output):
    return None


class Injected(RuntimeError):
    pass


FAILED = (Injected, PassError)  # the pass manager names the pass that failed around the original error


@fxpass(reads=("model",), writes=())
def _boom(model):
    """Fails (a stand-in for any pass that raises)."""
    raise Injected("injected failure")


def _recipe_with_boom(name, position):
    recipe = get_recipe(name)
    passes = recipe.passes[:position] + (_boom,) + recipe.passes[position:]
    return dataclasses.replace(recipe, name=f"{name}-boom-{position}", passes=passes)


@pytest.mark.parametrize("name, position", [(name, k) for name in ("s2ft", "sltrain")
                                            for k in range(1, len(get_recipe(name).passes) + 1)])
def test_a_failure_after_any_pass_rolls_everything_back(name, position):
    model = _model()
    before = _snapshot(model)
    recipe = _recipe_with_boom(name, position)
    _, config = resolve_recipe(name, OPTIONS[name])
    with pytest.raises(FAILED, match="fail"):
        apply_recipe(model, recipe, config)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("name", ["s2ft", "sltrain", "lowrank"])
def test_a_failure_in_finish_rolls_everything_back(name):
    def finish(model, context):
        if get_recipe(name).finish is not None:
            get_recipe(name).finish(model, context)
        raise Injected("finish failed")

    model = _model()
    before = _snapshot(model)
    _, config = resolve_recipe(name, OPTIONS[name])
    with pytest.raises(FAILED, match="fail"):
        apply_recipe(model, dataclasses.replace(get_recipe(name), finish=finish), config)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("name, call", [("s2ft", 3), ("sltrain", 5), ("lowrank", 9)])
def test_a_failure_halfway_through_the_module_swaps_rolls_back(monkeypatch, name, call):
    real = nn.Module.set_submodule
    calls = {"n": 0}

    def failing(self, target, module, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise Injected(f"swap {call} failed")
        return real(self, target, module, *args, **kwargs)

    model = _model()
    before = _snapshot(model)
    monkeypatch.setattr(nn.Module, "set_submodule", failing)
    with pytest.raises(FAILED, match="fail"):
        fxsparse.transform(model, name, **OPTIONS[name])
    monkeypatch.undo()
    _assert_unchanged(model, before)


def test_a_failure_halfway_through_the_permutation_rolls_back(monkeypatch):
    import fxsparse.passes.permute_coupled as permute

    real = permute._permute_projection
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # three projections already moved in place
            raise Injected("permutation failed")
        return real(*args, **kwargs)

    model = _model()
    before = _snapshot(model)
    monkeypatch.setattr(permute, "_permute_projection", failing)
    with pytest.raises(FAILED, match="fail"):
        fxsparse.transform(model, "s2ft", **OPTIONS["s2ft"])
    monkeypatch.undo()
    assert calls["n"] >= 4
    _assert_unchanged(model, before)


def test_a_failing_function_check_rolls_back(monkeypatch):
    import fxsparse.passes.check_function as check

    monkeypatch.setitem(check.TOLERANCE, torch.float32, -1.0)  # every unit "differs"
    model = _model()
    before = _snapshot(model)
    with pytest.raises((check.FunctionChangedError, PassError), match="computes another function"):
        fxsparse.transform(model, "s2ft", **OPTIONS["s2ft"])
    _assert_unchanged(model, before)


def test_a_model_with_an_fxsparse_layer_already_inside_is_refused_untouched():
    model = _model()
    path = "model.layers.0.mlp.up_proj"
    model.set_submodule(path, fxsparse.layers.sltrain.SLTrainLinear.from_linear(model.get_submodule(path), rank=4))
    before = _snapshot(model)
    for name in ("sltrain", "s2ft"):
        with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj is already an fxsparse SLTrainLinear"):
            fxsparse.transform(model, name, **OPTIONS[name])
    _assert_unchanged(model, before)


def test_a_failing_adapter_load_leaves_the_base_untouched(tmp_path, monkeypatch):
    trained = fxsparse.transform(tiny_model("llama"), "s2ft", **OPTIONS["s2ft"])
    folder = fxsparse.save_adapter(trained, tmp_path)
    blocks = trained._fxsparse_s2ft.replaced
    model = _model()
    before = _snapshot(model)
    real = torch.Tensor.copy_
    calls = {"n": 0}

    def failing(self, *args, **kwargs):
        if isinstance(self, nn.Parameter) and self.requires_grad:  # S2FT blocks: built, then the adapter's values
            calls["n"] += 1
            if calls["n"] == len(blocks) + 3:  # the adapter's 3rd block is being written
                raise Injected("copy failed")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", failing)
    with pytest.raises(FAILED, match="fail"):
        fxsparse.load_adapter(model, folder)
    monkeypatch.undo()
    assert calls["n"] == len(blocks) + 3
    _assert_unchanged(model, before)


class _ShortNamedMLP(nn.Module):
    """A gated FFN whose submodules are called like the recomputing module's own attributes would be."""

    def __init__(self, source):
        super().__init__()
        self.gate, self.up, self.down, self.activation = (source.gate_proj, source.up_proj, source.down_proj,
                                                          source.act_fn)

    def forward(self, x):
        return self.down(self.activation(self.gate(x)) * self.up(x))


def test_ffn_submodules_named_gate_up_down_activation_transform_and_merge():
    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.mlp = _ShortNamedMLP(layer.mlp)
    x = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    mlps = [layer.mlp for layer in model.model.layers]
    with torch.no_grad():
        before = model(x).logits
    fxsparse.transform(model, "s2ft", ratios={"gate": 0.1, "up": 0.1, "down": 0.1})
    assert type(model.model.layers[0].mlp).__name__ == "RecomputingGatedFFN"
    assert {k.removeprefix("model.layers.0.mlp.").split(".")[0] for k in model.state_dict()
            if k.startswith("model.layers.0.mlp.")} == {"gate", "up", "down"}
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, rtol=0, atol=1e-5)
    merged = fxsparse.merge(model)
    assert [layer.mlp for layer in merged.model.layers] == mlps  # the user's own modules come back
    assert all(torch.equal(merged.state_dict()[k], v) for k, v in original.items())
