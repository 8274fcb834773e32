"""Adapters are tied to their base (issue 13, point 4) and their files are written atomically and checked
on load (point 6, adapter half); malformed adapter folders are ValueErrors naming the key (point 12)."""

import copy
import functools
import json
import os
import warnings

import pytest
import torch

import fxsparse
from fxsparse.adapters import AdapterSwitcher, BaseMismatchError, CorruptAdapterError, MultiAdapterModel
from fxsparse.models import tiny_model

RATIOS = {"o": 0.5, "v": 0.5, "down": 0.1}


@functools.cache
def _trained_once(seed, arch):
    model = fxsparse.transform(tiny_model(arch, seed=seed), "s2ft", ratios=RATIOS, seed=3)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in fxsparse.trainable_parameters(model):
            p.add_(0.5 * torch.randn(p.shape, generator=generator))
    return model


def _trained(seed=0, arch="llama"):
    return copy.deepcopy(_trained_once(seed, arch))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return fxsparse.save_adapter(_trained(), tmp_path_factory.mktemp("adapter"))


def _snapshot(model):
    return ([(name, type(m).__name__) for name, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            sorted(k for k in vars(model) if k.startswith("_fxsparse") or k == "save_pretrained"))


def _assert_unchanged(model, snapshot):
    modules, state, flags, attributes = _snapshot(model)
    assert modules == snapshot[0] and flags == snapshot[2] and attributes == snapshot[3]
    assert state.keys() == snapshot[1].keys() and all(torch.equal(state[k], v) for k, v in snapshot[1].items())


def _selected_rows(model, meta, path):
    info = meta["modules"][path]
    return model.get_submodule(path).weight.detach().index_select(info["dim"], torch.tensor(info["index"]))


# ---------------------------------------------------------------- point 4: tied to the base


def test_the_adapter_records_the_base_it_was_trained_on(adapter):
    meta = json.loads((adapter / "adapter.json").read_text())
    assert meta["format"] == 2 and len(meta["tensors_sha256"]) == 64
    base = tiny_model("llama")
    for path, info in meta["modules"].items():
        assert info["base_sha256"] == fxsparse.layers.s2ft.values_fingerprint(_selected_rows(base, meta, path))


def test_another_base_is_refused_by_name_and_left_untouched(adapter):
    other = tiny_model("llama", seed=1)  # same class and shapes, other weights (another fine-tune, another seed)
    before = _snapshot(other)
    with pytest.raises(BaseMismatchError, match=r"another base model.*model\.layers\.0\.self_attn\.o_proj"
                                                 r".*allow_other_base=True"):
        fxsparse.load_adapter(other, adapter)
    _assert_unchanged(other, before)
    assert issubclass(BaseMismatchError, ValueError)


def test_a_single_changed_base_row_is_named(adapter):
    base = tiny_model("llama")
    meta = json.loads((adapter / "adapter.json").read_text())
    with torch.no_grad():  # one selected column of one projection differs: only that projection is named
        base.model.layers[1].mlp.down_proj.weight[0, meta["modules"]["model.layers.1.mlp.down_proj"]["index"][0]] += 1
    with pytest.raises(BaseMismatchError) as info:
        fxsparse.load_adapter(base, adapter)
    assert "model.layers.1.mlp.down_proj" in str(info.value) and "layers.0" not in str(info.value)


def test_allow_other_base_writes_the_trained_values_on_purpose(adapter):
    trained = _trained()
    loaded = fxsparse.load_adapter(tiny_model("llama", seed=1), adapter, allow_other_base=True)
    for path in loaded._fxsparse_s2ft.replaced:
        assert torch.equal(loaded.get_submodule(path).block, trained.get_submodule(path).block)
    with pytest.raises(ValueError, match="allow_other_base"):
        fxsparse.load_adapter(tiny_model("llama"), adapter, allow_other_base="yes")


def test_a_bfloat16_copy_of_the_base_is_the_same_base(adapter):
    model = fxsparse.load_adapter(tiny_model("llama").to(torch.bfloat16), adapter)
    assert model._fxsparse_recipe == "s2ft"


def test_a_resumed_model_keeps_the_base_fingerprint(tmp_path, adapter):
    """A checkpoint (state dict) loaded into a model transformed the same way carries the fingerprint on."""
    trained = _trained()
    resumed = fxsparse.transform(tiny_model("llama"), "s2ft", ratios=RATIOS, seed=3)
    resumed.load_state_dict(trained.state_dict())
    fxsparse.save_adapter(resumed, tmp_path)
    saved = json.loads((tmp_path / "adapter.json").read_text())["modules"]
    assert saved == json.loads((adapter / "adapter.json").read_text())["modules"]


def test_adapters_without_a_fingerprint_still_load_with_one_warning(tmp_path, adapter):
    meta = json.loads((adapter / "adapter.json").read_text())
    meta["format"] = 1
    del meta["tensors_sha256"]
    for info in meta["modules"].values():
        del info["base_sha256"]
    (tmp_path / "adapter.json").write_text(json.dumps(meta))
    (tmp_path / "adapter.safetensors").write_bytes((adapter / "adapter.safetensors").read_bytes())
    with pytest.warns(UserWarning, match="no fingerprint"):
        fxsparse.load_adapter(tiny_model("llama", seed=1), tmp_path)  # cannot be checked: applied
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fxsparse.load_adapter(tiny_model("llama"), tmp_path)  # warned once per folder


def test_the_switcher_refuses_another_base_and_keeps_the_active_adapter(tmp_path, adapter):
    base = tiny_model("llama")
    original = _snapshot(base)
    switcher = AdapterSwitcher(base)
    switcher.apply(adapter)
    with_adapter = _snapshot(base)
    # an adapter trained on another base, and one that does not fit at all: refused, adapter kept as it was
    foreign = fxsparse.save_adapter(_trained(seed=1), tmp_path / "foreign")
    with pytest.raises(BaseMismatchError, match="o_proj"):
        switcher.apply(foreign)
    _assert_unchanged(base, with_adapter)
    assert switcher.active == str(adapter)
    qwen = fxsparse.save_adapter(_trained(arch="qwen2"), tmp_path / "qwen2")
    with pytest.raises(ValueError, match="Qwen2ForCausalLM"):
        switcher.apply(qwen)
    _assert_unchanged(base, with_adapter)
    switcher.apply(foreign, allow_other_base=True)
    assert switcher.active == str(foreign)
    switcher.remove()
    _assert_unchanged(base, original)


def test_the_switcher_rolls_back_a_failure_halfway(monkeypatch, adapter):
    base = tiny_model("llama")
    switcher = AdapterSwitcher(base)
    switcher.apply(adapter)
    with_adapter = _snapshot(base)
    calls = {"n": 0}
    real = torch.Tensor.index_copy_

    def failing(self, *args):
        calls["n"] += 1
        if calls["n"] == 4:  # the 4th write of the new adapter
            raise RuntimeError("device lost")
        return real(self, *args)

    monkeypatch.setattr(torch.Tensor, "index_copy_", failing)
    with pytest.raises(RuntimeError, match="device lost"):
        switcher.apply(adapter)
    monkeypatch.undo()
    _assert_unchanged(base, with_adapter)
    assert switcher.active == str(adapter)


def test_serving_refuses_another_base_and_leaves_the_model_alone(adapter):
    other = tiny_model("llama", seed=1)
    before = _snapshot(other)
    with pytest.raises(BaseMismatchError, match=r"adapter 'a'.*o_proj"):
        MultiAdapterModel(other, {"a": adapter})
    _assert_unchanged(other, before)
    served = MultiAdapterModel(other, {"a": adapter}, allow_other_base=True)
    assert served.unwrap() is other


# ---------------------------------------------------------------- point 6: corrupt and interrupted files


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_a_corrupt_tensors_file_names_itself_and_the_fix(tmp_path, adapter, damage):
    for name in ("adapter.json", "adapter.safetensors"):
        (tmp_path / name).write_bytes((adapter / name).read_bytes())
    tensors = tmp_path / "adapter.safetensors"
    data = bytearray(tensors.read_bytes())
    if damage == "flip":
        data[-5] ^= 0x10  # one bit of one trained value: safetensors would load it without complaint
    tensors.write_bytes(bytes(data) if damage == "flip" else bytes(data[:len(data) // 2]) if damage == "truncate"
                        else b"")
    model = tiny_model("llama")
    before = _snapshot(model)
    with pytest.raises(CorruptAdapterError, match=r"adapter\.safetensors.*sha256.*Save the adapter again"):
        fxsparse.load_adapter(model, tmp_path)
    _assert_unchanged(model, before)


def test_an_interrupted_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    first = fxsparse.save_adapter(_trained(), tmp_path)
    saved = {name: (first / name).read_bytes() for name in ("adapter.json", "adapter.safetensors")}
    real = os.fsync

    def crash(fd):
        real(fd)
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        fxsparse.save_adapter(_trained(seed=1), tmp_path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.json", "adapter.safetensors"]  # no temp left
    assert {name: (first / name).read_bytes() for name in saved} == saved
    fxsparse.load_adapter(tiny_model("llama"), tmp_path)


def test_saving_over_an_adapter_replaces_both_files(tmp_path):
    fxsparse.save_adapter(_trained(), tmp_path)
    fxsparse.save_adapter(_trained(seed=1), tmp_path)
    with pytest.raises(BaseMismatchError):
        fxsparse.load_adapter(tiny_model("llama"), tmp_path)
    fxsparse.load_adapter(tiny_model("llama", seed=1), tmp_path)


# ---------------------------------------------------------------- point 12: malformed folders


@pytest.mark.parametrize("key", ["plan", "modules"])
def test_json_missing_a_top_level_key_names_it(tmp_path, adapter, key):
    meta = json.loads((adapter / "adapter.json").read_text())
    del meta[key]
    (tmp_path / "adapter.json").write_text(json.dumps(meta))
    (tmp_path / "adapter.safetensors").write_bytes((adapter / "adapter.safetensors").read_bytes())
    with pytest.raises(ValueError, match=f"lacks the key '{key}'"):
        fxsparse.load_adapter(tiny_model("llama"), tmp_path)


@pytest.mark.parametrize("key", ["dim", "shape", "index"])
def test_json_missing_a_module_key_names_it_and_the_module(tmp_path, adapter, key):
    meta = json.loads((adapter / "adapter.json").read_text())
    name = sorted(meta["modules"])[0]
    del meta["modules"][name][key]
    (tmp_path / "adapter.json").write_text(json.dumps(meta))
    (tmp_path / "adapter.safetensors").write_bytes((adapter / "adapter.safetensors").read_bytes())
    for apply in (lambda: fxsparse.load_adapter(tiny_model("llama"), tmp_path),
                  lambda: AdapterSwitcher(tiny_model("llama")).apply(tmp_path),
                  lambda: MultiAdapterModel(tiny_model("llama"), {"a": tmp_path})):
        with pytest.raises(ValueError, match=rf"module '{name}' lacks the key '{key}'"):
            apply()


@pytest.mark.parametrize("name", ["adapter.json", "adapter.safetensors"])
def test_a_file_path_instead_of_the_folder_says_to_pass_the_folder(adapter, name):
    with pytest.raises(ValueError, match=rf"is a file: pass the adapter folder \({adapter}\)"):
        fxsparse.load_adapter(tiny_model("llama"), adapter / name)
