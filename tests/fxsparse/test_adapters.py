"""S2FT adapters: save/load round trip, validation errors, in-place switching on a merged model."""

import copy
import json

import pytest
import torch

import fxsparse
from fxsparse.adapters import AdapterSwitcher, read_adapter
from fxsparse.models import tiny_model

RATIOS = {"o": 0.34, "v": 0.5, "down": 0.1}


def _trained(arch="llama", seed=0, scale=0.5):
    model = fxsparse.transform(tiny_model(arch), "s2ft", ratios=RATIOS, seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in fxsparse.trainable_parameters(model):
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return model


def _ids():
    return torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2"])
def test_round_trip_gives_the_trained_model(tmp_path, arch):
    trained = _trained(arch)
    fxsparse.save_adapter(trained, tmp_path)
    loaded = fxsparse.load_adapter(tiny_model(arch), tmp_path)
    x = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, trained(x).logits)
    # merging the loaded model equals merging the trained one
    a, b = fxsparse.merge(trained).state_dict(), fxsparse.merge(loaded).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_adapter_holds_only_the_blocks(tmp_path):
    trained = _trained()
    fxsparse.save_adapter(trained, tmp_path)
    meta, tensors = read_adapter(tmp_path)
    assert sum(t.numel() for t in tensors.values()) == sum(p.numel() for p in fxsparse.trainable_parameters(trained))
    assert meta["plan"]["ratios"] == RATIOS and meta["model_class"] == "LlamaForCausalLM"


def test_other_architecture_is_rejected(tmp_path):
    fxsparse.save_adapter(_trained("llama"), tmp_path)
    with pytest.raises(ValueError, match="Qwen2ForCausalLM"):
        fxsparse.load_adapter(tiny_model("qwen2"), tmp_path)
    from transformers import AutoModelForCausalLM

    from fxsparse.models import tiny_config

    config = tiny_config("llama")
    config.num_key_value_heads = 3  # same class, other shape
    with pytest.raises(ValueError, match="num_kv_heads"):
        fxsparse.load_adapter(AutoModelForCausalLM.from_config(config), tmp_path)


def test_corrupt_files_are_value_errors(tmp_path):
    fxsparse.save_adapter(_trained(), tmp_path)
    tensors = tmp_path / "adapter.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt"):
        fxsparse.load_adapter(tiny_model("llama"), tmp_path)
    (tmp_path / "adapter.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt adapter metadata"):
        fxsparse.load_adapter(tiny_model("llama"), tmp_path)
    with pytest.raises(ValueError, match="not an adapter folder"):
        fxsparse.load_adapter(tiny_model("llama"), tmp_path / "missing")


def test_shape_mismatch_in_json_is_rejected(tmp_path):
    fxsparse.save_adapter(_trained(), tmp_path)
    meta = json.loads((tmp_path / "adapter.json").read_text())
    name = next(iter(meta["modules"]))
    meta["modules"][name]["shape"][0] += 1
    (tmp_path / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="shape"):
        fxsparse.load_adapter(tiny_model("llama"), tmp_path)


def test_switching_on_a_merged_model(tmp_path):
    first, second = _trained(seed=1), _trained(seed=2)
    fxsparse.save_adapter(first, tmp_path / "a")
    fxsparse.save_adapter(second, tmp_path / "b")
    expected_a = fxsparse.merge(copy.deepcopy(first)).state_dict()
    expected_b = fxsparse.merge(copy.deepcopy(second)).state_dict()
    base = tiny_model("llama")
    base_sd = copy.deepcopy(base.state_dict())
    switcher = AdapterSwitcher(base)
    switcher.apply(tmp_path / "a")
    assert all(torch.equal(base.state_dict()[k], v) for k, v in expected_a.items())
    switcher.apply(tmp_path / "b")  # removes a first
    assert all(torch.equal(base.state_dict()[k], v) for k, v in expected_b.items())
    switcher.remove()
    assert all(torch.equal(base.state_dict()[k], v) for k, v in base_sd.items())
    with pytest.raises(ValueError, match="plain"):
        AdapterSwitcher(first)
