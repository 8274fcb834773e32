"""State dicts carry what they were built with (issue 13, point 7) and layers built on the meta device are
recomputable after ``to_empty()`` (point 10): another plan or alpha raises by name, a garbage index raises
instead of crashing the sparse kernels."""

import io

import pytest
import torch

import fxsparse
from fxsparse.layers.s2ft import S2FTLinear, StateMismatchError
from fxsparse.layers.sltrain import SLTrainLinear
from fxsparse.models import tiny_model

RATIOS = {"o": 0.5, "v": 0.5, "down": 0.1}
SLTRAIN = {"rank": 4, "block_size": 8, "alpha": 16.0}


def _s2ft(seed=0, base=None):
    return fxsparse.transform(base if base is not None else tiny_model("llama"), "s2ft", ratios=RATIOS, seed=seed)


def _ids():
    return torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))


def _shake(model, seed=5):
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for p in fxsparse.trainable_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


# ---------------------------------------------------------------- point 7: the plan / alpha in the state dict


def test_an_s2ft_state_dict_of_another_plan_is_refused_by_name():
    trained, other = _shake(_s2ft(seed=0)), _s2ft(seed=1)  # same ratios and shapes, other units selected
    differing = [path for path in trained._fxsparse_s2ft.replaced
                 if trained._fxsparse_s2ft.replaced[path][2] != other._fxsparse_s2ft.replaced[path][2]]
    assert differing
    with pytest.raises(StateMismatchError, match=rf"{differing[0]}: the state dict was saved with another S2FT plan"):
        other.load_state_dict(trained.state_dict())
    assert issubclass(StateMismatchError, ValueError)


def test_a_model_transformed_the_same_way_resumes_from_the_state_dict():
    trained = _shake(_s2ft(seed=0))
    resumed = _s2ft(seed=0)
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)  # a checkpoint: every entry a tensor, loadable with weights_only
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert {n for n, p in resumed.named_parameters() if p.requires_grad} == {
        n for n, p in trained.named_parameters() if p.requires_grad}  # ordinary parameters for DDP/FSDP
    with torch.no_grad():
        assert torch.equal(resumed(_ids()).logits, trained(_ids()).logits)
    merged, expected = fxsparse.merge(resumed).state_dict(), fxsparse.merge(trained).state_dict()
    assert all(torch.equal(merged[k], v) for k, v in expected.items())


def test_state_dicts_written_before_the_plan_was_recorded_still_load():
    trained = _shake(_s2ft(seed=0))
    old = {k: v for k, v in trained.state_dict().items() if not k.endswith((".origin", ".base_sha256"))}
    resumed = _s2ft(seed=0)
    resumed.load_state_dict(old)  # strict
    with torch.no_grad():
        assert torch.equal(resumed(_ids()).logits, trained(_ids()).logits)


@pytest.mark.parametrize("recipe", ["s2ft", "sltrain"])
def test_a_refused_state_dict_changes_nothing(recipe):
    """All or nothing: the mismatch is in the last fxsparse layer only, yet no earlier tensor was overwritten
    (each layer used to check itself when torch reached it, after the earlier layers were copied)."""
    def build():
        if recipe == "s2ft":
            return _s2ft(seed=0)
        return fxsparse.transform(tiny_model("llama"), "sltrain", **SLTRAIN)

    trained, target = _shake(build(), seed=9), build()
    state = trained.state_dict()
    last = [name for name, m in target.named_modules() if isinstance(m, (S2FTLinear, SLTrainLinear))][-1]
    if recipe == "s2ft":
        state[f"{last}.origin"] = state[f"{last}.origin"].flip(0) + 1  # another plan for that layer only
    else:
        settings = state[f"{last}.settings"].clone()
        settings[1] += 1  # another rank recorded for that layer only
        state[f"{last}.settings"] = settings
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(StateMismatchError, match=last.replace(".", r"\.")):
        target.load_state_dict(state)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())
    fxsparse.merge(target)
    assert not target._load_state_dict_pre_hooks  # merge takes the check away with the fxsparse layers


def test_an_sltrain_state_dict_of_another_alpha_is_refused_by_name():
    trained = fxsparse.transform(tiny_model("llama"), "sltrain", **SLTRAIN)
    other = fxsparse.transform(tiny_model("llama"), "sltrain", **{**SLTRAIN, "alpha": 8.0})
    with pytest.raises(StateMismatchError, match=r"model\.layers\.0\.self_attn\.q_proj: .*alpha=16\.0 "
                                                 r"\(this layer: 8\.0\)"):
        other.load_state_dict(trained.state_dict())
    same = fxsparse.transform(tiny_model("llama"), "sltrain", **SLTRAIN)
    same.load_state_dict(trained.state_dict())
    old = {k: v for k, v in trained.state_dict().items() if not k.endswith(".settings")}
    same.load_state_dict(old)  # written before the settings were recorded: loads, strict


def test_the_settings_survive_a_dtype_change():
    model = fxsparse.transform(tiny_model("llama"), "sltrain", **{**SLTRAIN, "alpha": 0.1})
    state = model.to(torch.bfloat16).state_dict()  # an int64 buffer: to(dtype) leaves it exact
    again = fxsparse.transform(tiny_model("llama"), "sltrain", **{**SLTRAIN, "alpha": 0.1}).to(torch.bfloat16)
    again.load_state_dict(state)


@pytest.mark.parametrize("key, value", [("model.layers.0.self_attn.o_proj.index", 10**6),
                                        ("model.layers.0.mlp.down_proj.index", -3)])
def test_a_corrupt_s2ft_index_in_a_state_dict_raises(key, value):
    state = _s2ft(seed=0).state_dict()
    state[key] = state[key].clone()
    state[key][0] = value
    with pytest.raises(StateMismatchError, match=rf"{key.removesuffix('.index')}: the state dict's index is invalid"):
        _s2ft(seed=0).load_state_dict(state)


@pytest.mark.parametrize("support", ["random", "block"])
def test_a_corrupt_sltrain_support_in_a_state_dict_raises(support):
    model = fxsparse.transform(tiny_model("llama"), "sltrain", support=support, **SLTRAIN)
    state = model.state_dict()
    key = "model.layers.1.mlp.up_proj." + ("support_col" if support == "random" else "tile_col")
    state[key] = torch.full_like(state[key], 2**30)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj: invalid sparse support"):
        fxsparse.transform(tiny_model("llama"), "sltrain", support=support, **SLTRAIN).load_state_dict(state)


# ---------------------------------------------------------------- point 10: meta -> to_empty()


def _on_meta(recipe, **options):
    with torch.device("meta"):
        model = tiny_model("llama")
    return fxsparse.transform(model, recipe, **options)


def _index_buffers(model):
    return {name: b for name, b in model.named_buffers() if not b.is_floating_point() and "rotary" not in name}


def _fix_rotary(model, reference):
    # transformers' own non-persistent rotary buffers are uninitialised after to_empty() as well (not ours)
    with torch.no_grad():
        for (name, b), ref in zip(model.named_buffers(), reference.buffers(), strict=True):
            if "rotary" in name:
                b.copy_(ref)


@pytest.mark.parametrize("recipe, options", [("sltrain", {**SLTRAIN, "support": "random"}),
                                             ("sltrain", {**SLTRAIN, "support": "block"}),
                                             ("s2ft", {"ratios": RATIOS})])
def test_to_empty_rebuilds_indices_and_supports(recipe, options):
    meta = _on_meta(recipe, **options)
    reference = fxsparse.transform(tiny_model("llama"), recipe, **options)
    meta.to_empty(device="cpu")
    expected = _index_buffers(reference)
    got = _index_buffers(meta)
    assert got.keys() == expected.keys()
    differ = [k for k, v in expected.items() if not torch.equal(got[k], v) and not k.endswith("base_sha256")]
    assert not differ, differ  # every index buffer, persistent or derived, is the CPU-transformed model's
    fxsparse.materialize(meta)  # idempotent
    _fix_rotary(meta, reference)
    meta.load_state_dict(reference.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(meta(_ids()).logits, reference(_ids()).logits, rtol=0, atol=0)


def test_the_meta_transformed_s2ft_model_trains_and_saves_an_adapter_tied_to_its_base(tmp_path):
    meta = _on_meta("s2ft", ratios=RATIOS)
    meta.to_empty(device="cpu")
    reference = _shake(_s2ft(seed=0))
    _fix_rotary(meta, reference)
    meta.load_state_dict(reference.state_dict())  # the checkpoint brings the weights and the base fingerprint
    assert all(m.base_fingerprint is not None for m in meta.modules() if isinstance(m, S2FTLinear))
    fxsparse.save_adapter(meta, tmp_path)
    fxsparse.load_adapter(tiny_model("llama"), tmp_path)  # the right base: accepted


def test_a_garbage_support_raises_instead_of_crashing():
    layer = SLTrainLinear(40, 48, rank=4, sparsity=0.1, seed=1)
    layer.check_support()
    with torch.no_grad():
        layer.support_crow.fill_(-7)  # what uninitialised memory can hold
    with pytest.raises(ValueError, match="invalid sparse support.*support_crow"):
        layer.check_support()
    layer.reset_support()  # drawn again from the seed
    fresh = SLTrainLinear(40, 48, rank=4, sparsity=0.1, seed=1)
    assert torch.equal(layer.support_crow, fresh.support_crow) and torch.equal(layer._t_perm, fresh._t_perm)
