"""S2FT adapters: save/load round trip, validation errors, in-place switching on a merged model."""

import copy
import hashlib
import json

import pytest
import torch

import fxsparse
from fxsparse.adapters import AdapterSwitcher, MultiAdapterModel, read_adapter
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


# ---------------------------------------------------------------- serving several adapters in one batch

# Two adapters with different projections and counts: a (columns of o/down, rows of v), b (columns of o/down
# with other widths, rows of up). After merging they are gathered positions in the original numbering.
SERVE_RATIOS = {"a": {"o": 0.34, "v": 0.5, "down": 0.1}, "b": {"o": 0.5, "up": 0.2, "down": 0.2}}


@pytest.fixture(scope="module")
def served_adapters(tmp_path_factory):
    """Adapter folders and, per adapter (and the base, None), the merged plain model it must equal."""
    root = tmp_path_factory.mktemp("serve")
    folders, merged = {}, {None: tiny_model("llama").eval()}
    for seed, (name, ratios) in enumerate(SERVE_RATIOS.items(), start=1):
        model = fxsparse.transform(tiny_model("llama"), "s2ft", ratios=ratios, seed=seed)
        generator = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for p in fxsparse.trainable_parameters(model):
                p.add_(0.5 * torch.randn(p.shape, generator=generator))
        folders[name] = fxsparse.save_adapter(model, root / name)
        merged[name] = fxsparse.merge(fxsparse.load_adapter(tiny_model("llama"), folders[name])).eval()
    return folders, merged


@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_mixed_batch_rows_equal_their_merged_models(monkeypatch, served_adapters, mode):
    from fxsparse.codegen.s2ft import launch_counts

    monkeypatch.setenv("FXSPARSE_KERNELS", mode)
    folders, merged = served_adapters
    served = MultiAdapterModel(tiny_model("llama").eval(), folders)
    ids = torch.randint(0, 96, (5, 9), generator=torch.Generator().manual_seed(3))
    rows = ["a", None, "b", 0, -1]  # by name, base, by number
    before = launch_counts()
    with torch.no_grad():
        logits = served(ids, adapter_ids=rows).logits
        for r, adapter in enumerate(["a", None, "b", "a", None]):
            expected = merged[adapter](ids[r:r + 1]).logits[0]
            torch.testing.assert_close(logits[r], expected, rtol=1e-5, atol=1e-5)
        # rows really differ by adapter: the same tokens give other logits under another adapter
        assert not torch.allclose(served(ids[:1], adapter_ids=["b"]).logits, logits[:1], atol=1e-3)
    launched = sum(v - before.get(k, 0) for k, v in launch_counts().items() if k.startswith("s2ft_multi"))
    assert (launched > 0) == (mode == "triton")


def test_generate_follows_each_rows_adapter(served_adapters):
    folders, merged = served_adapters
    served = MultiAdapterModel(tiny_model("llama").eval(), folders)
    prompt = torch.randint(1, 96, (3, 5), generator=torch.Generator().manual_seed(4))
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    out = served.generate(prompt, adapter_ids=["b", "a", None], **kwargs)
    for r, adapter in enumerate(["b", "a", None]):
        assert torch.equal(out[r], merged[adapter].generate(prompt[r:r + 1], **kwargs)[0])
    # two return sequences per prompt: each copy of a row keeps its row's adapter
    beams = served.generate(prompt[:2], adapter_ids=["b", "a"], num_beams=2, num_return_sequences=2, **kwargs)
    single = merged["a"].generate(prompt[1:2], num_beams=2, num_return_sequences=2, **kwargs)
    assert torch.equal(beams[2:], single)


def test_serving_leaves_the_base_model_restorable(served_adapters):
    folders, _ = served_adapters
    base = tiny_model("llama")
    state = copy.deepcopy(base.state_dict())
    served = MultiAdapterModel(base, folders)
    assert served.config is base.config and set(served.model.state_dict()) == set(state)
    wrapped = [n for n, m in base.named_modules() if type(m).__name__ == "MultiAdapterLinear"]
    assert wrapped and all(n.endswith(("o_proj", "v_proj", "up_proj", "down_proj")) for n in wrapped)
    restored = served.unwrap()
    assert restored is base and not any(type(m).__name__ == "MultiAdapterLinear" for m in base.modules())
    assert all(torch.equal(base.state_dict()[k], v) for k, v in state.items())


def _doctored(source, target, module, new_name, grow_rows):
    """A copy of adapter ``source`` with ``module`` renamed and its block grown by ``grow_rows`` rows."""
    from safetensors.torch import save_file

    meta, tensors = read_adapter(source)
    block = tensors.pop(module)
    block = torch.cat([block, torch.zeros(grow_rows, block.shape[1])])
    info = meta["modules"].pop(module)
    info["shape"] = list(block.shape)
    meta["modules"][new_name], tensors[new_name] = info, block
    target.mkdir()
    save_file(tensors, str(target / "adapter.safetensors"))
    meta["tensors_sha256"] = hashlib.sha256((target / "adapter.safetensors").read_bytes()).hexdigest()
    (target / "adapter.json").write_text(json.dumps(meta))
    return target


def test_serving_validates_adapters_and_ids(tmp_path, served_adapters):
    from transformers import AutoModelForCausalLM

    from fxsparse.models import tiny_config

    folders, _ = served_adapters
    with pytest.raises(ValueError, match="Qwen2ForCausalLM"):
        MultiAdapterModel(tiny_model("qwen2"), folders)
    config = tiny_config("llama")
    config.num_key_value_heads = 3  # same class, other attention
    with pytest.raises(ValueError, match=r"adapter 'a'.*num_kv_heads"):
        MultiAdapterModel(AutoModelForCausalLM.from_config(config), {"a": folders["a"]})
    # files that pass read_adapter but do not fit the model: the module and the problem are named
    down = "model.layers.0.mlp.down_proj"
    for new_name, grow, match in [("model.layers.0.mlp.down", 0, r"module 'model\.layers\.0\.mlp\.down' is not"),
                                  ("model.layers.0.mlp.act_fn", 0, r"act_fn' is a SiLU"),
                                  (down, 1, r"block model\.layers\.0\.mlp\.down_proj has shape \[49, ")]:
        folder = _doctored(folders["a"], tmp_path / new_name, down, new_name, grow)
        with pytest.raises(ValueError, match=r"adapter 'x'.*" + match):
            MultiAdapterModel(tiny_model("llama"), {"x": folder})
    with pytest.raises(ValueError, match="not an adapter folder"):
        MultiAdapterModel(tiny_model("llama"), {"a": tmp_path / "missing"})
    with pytest.raises(ValueError, match="plain"):
        MultiAdapterModel(fxsparse.transform(tiny_model("llama"), "s2ft"), folders)
    served = MultiAdapterModel(tiny_model("llama"), folders)
    ids = torch.randint(0, 96, (2, 4))
    with pytest.raises(ValueError, match="unknown adapter 'c'"):
        served(ids, adapter_ids=["a", "c"])
    with pytest.raises(ValueError, match="2"):
        served(ids, adapter_ids=[0, 2])
    with pytest.raises(ValueError, match="3 entries for a batch of 2"):
        served(ids, adapter_ids=["a", "b", None])
