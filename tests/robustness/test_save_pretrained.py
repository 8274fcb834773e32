"""``save_pretrained`` of a transformed model refuses (its state dict is not the model transformers would
rebuild); ``fxsparse.merge`` lifts the refusal, and the merged model reloads with plain transformers to
the same logits."""

import copy

import pytest
import torch

import fxsparse
from fxsparse.models import tiny_model
from fxsparse.recipes import SaveRefused


def _ids():
    return torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))


def _trained(recipe, **options):
    model = fxsparse.transform(tiny_model("llama"), recipe, **options)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in fxsparse.trainable_parameters(model):
            p.add_(0.5 * torch.randn(p.shape, generator=generator))
    return model.eval()


CASES = {"s2ft": dict(ratios={"o": 0.5, "down": 0.25}, seed=0),
         "sltrain": dict(rank=4, block_size=8, sparsity=0.05),
         "lowrank": dict(rank=4)}


@pytest.mark.parametrize("recipe", list(CASES))
def test_transformed_model_refuses_and_writes_nothing(tmp_path, recipe):
    model = _trained(recipe, **CASES[recipe])
    with pytest.raises(ValueError, match=r"fxsparse\.merge\(model\)") as info:
        model.save_pretrained(tmp_path / "out")
    assert f"recipe {recipe!r}" in str(info.value)
    assert ("save_adapter" in str(info.value)) == (recipe == "s2ft")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="merge"):
        model.save_pretrained(tmp_path / "out", safe_serialization=True)
    assert type(tiny_model("llama")).save_pretrained is type(model).save_pretrained  # the class is untouched


@pytest.mark.parametrize("recipe", list(CASES))
def test_merge_lifts_the_refusal_and_the_folder_reloads_to_the_same_logits(tmp_path, recipe):
    from transformers import AutoModelForCausalLM

    model = _trained(recipe, **CASES[recipe])
    with torch.no_grad():
        expected = model(_ids()).logits
    merged = fxsparse.merge(model)
    assert "save_pretrained" not in vars(merged)
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert set(reloaded.state_dict()) == set(tiny_model("llama").state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(_ids()).logits, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(expected, tiny_model("llama").eval()(_ids()).logits, atol=1e-3)  # training showed


def test_a_merged_deep_copy_saves_while_the_live_model_keeps_training(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _trained("s2ft", **CASES["s2ft"])
    with torch.no_grad():
        expected = model(_ids()).logits
    copied = copy.deepcopy(model)
    assert isinstance(vars(copied)["save_pretrained"], SaveRefused)
    assert vars(copied)["save_pretrained"].model is copied
    fxsparse.merge(copied).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="merge"):
        model.save_pretrained(tmp_path / "live")
    assert model._fxsparse_recipe == "s2ft" and fxsparse.trainable_parameters(model)
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path).eval()(_ids()).logits, expected,
                                   atol=1e-4, rtol=1e-4)


def test_a_merge_by_hand_is_seen_by_the_guard(tmp_path):
    model = _trained("sltrain", **CASES["sltrain"])
    from fxsparse.recipes import get_recipe

    get_recipe("sltrain").merge(model)  # as fxsparse.merge does, then the recipe mark goes
    vars(model)["save_pretrained"] = SaveRefused(model, "sltrain")  # a guard a custom recipe's merge left behind
    del model._fxsparse_recipe
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists() and "save_pretrained" not in vars(model)


def test_retransform_after_merge_refuses_again(tmp_path):
    model = fxsparse.merge(_trained("s2ft", **CASES["s2ft"]))
    model = fxsparse.transform(model, "s2ft", ratios={"v": 0.5})
    with pytest.raises(ValueError, match="save_adapter"):
        model.save_pretrained(tmp_path)
    fxsparse.merge(model).save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists()


def test_trainer_checkpoint_of_a_transformed_model_refuses(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = fxsparse.transform(tiny_model("llama"), "s2ft", ratios={"o": 0.5})
    data = [{"input_ids": row, "labels": row} for row in _ids()]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, optim="sgd",
                             use_cpu=True, report_to="none", save_strategy="steps", save_steps=1,
                             disable_tqdm=True)
    with pytest.raises(ValueError, match="save_pretrained refused"):
        Trainer(model=model, args=args, train_dataset=data).train()
