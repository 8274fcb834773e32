"""Bad options to ``fxsparse.transform``: each a ``ValueError`` naming the value and what is allowed, with
the model left exactly as it was. The table is data: ``bad_inputs.json`` beside this file."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import fxsparse
from fxsparse.models import tiny_model
from fxsparse.recipes.s2ft import S2FTConfig
from fxsparse.recipes.sltrain import LowRankConfig, SLTrainConfig

TABLE = json.loads((Path(__file__).with_name("bad_inputs.json")).read_text())["cases"]


def _value(raw):
    if isinstance(raw, dict) and set(raw) == {"py"}:
        return eval(raw["py"], {"math": math, "np": np, "torch": torch})  # noqa: S307 - the table's own literals
    return raw


def _snapshot(model):
    return ([(name, type(m)) for name, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def test_the_table_is_well_formed():
    ids = [case["id"] for case in TABLE]
    assert len(ids) == len(set(ids)) and len(ids) >= 40
    assert all(case["match"] for case in TABLE)


@pytest.mark.parametrize("case", TABLE, ids=[case["id"] for case in TABLE])
def test_bad_option_raises_a_value_error_naming_it(case):
    model = tiny_model("llama")
    modules, state, flags = _snapshot(model)
    options = {key: _value(raw) for key, raw in case["options"].items()}
    with pytest.raises(ValueError) as info:
        fxsparse.transform(model, case["recipe"], **options)
    message = str(info.value)
    missing = [part for part in case["match"] if part not in message]
    assert not missing, f"{missing} not in: {message}"
    after_modules, after_state, after_flags = _snapshot(model)
    assert after_modules == modules and after_flags == flags
    assert all(torch.equal(after_state[k], v) for k, v in state.items())
    assert getattr(model, "_fxsparse_recipe", None) is None
    assert "save_pretrained" not in vars(model)


@pytest.mark.parametrize("ratio", [0.25, np.float32(0.25), np.float64(0.25), torch.tensor(0.25),
                                   torch.tensor(0.25, dtype=torch.float16), np.int64(1), torch.tensor(0)])
def test_numpy_and_torch_scalar_ratios_are_accepted_as_floats(ratio):
    config = S2FTConfig(ratios={"o": ratio})
    assert type(config.ratios["o"]) is float and config.ratios["o"] == float(ratio)
    plain = fxsparse.transform(tiny_model("llama"), "s2ft", ratios={"o": 0.25}, seed=3)
    scalar = fxsparse.transform(tiny_model("llama"), "s2ft", ratios={"o": ratio}, seed=3) if ratio == 0.25 else None
    if scalar is not None:
        assert plain._fxsparse_s2ft.plan.to_dict() == scalar._fxsparse_s2ft.plan.to_dict()


def test_a_single_int_layer_means_that_block():
    assert S2FTConfig(layers=1).layers == (1,)
    assert S2FTConfig(layers=np.int64(1)).layers == (1,)
    assert S2FTConfig(layers=range(2)).layers == (0, 1)
    one = fxsparse.transform(tiny_model("llama"), "s2ft", ratios={"o": 0.5, "down": 0.1}, layers=1)
    listed = fxsparse.transform(tiny_model("llama"), "s2ft", ratios={"o": 0.5, "down": 0.1}, layers=[1])
    plan = one._fxsparse_s2ft.plan
    assert plan.to_dict() == listed._fxsparse_s2ft.plan.to_dict() and plan.layers == [1]


def test_seeds_and_sltrain_scalars_are_normalised():
    assert S2FTConfig(seed=np.int64(5)).seed == 5 and type(S2FTConfig(seed=np.int64(5)).seed) is int
    assert S2FTConfig(seed=2**63 - 1).seed == 2**63 - 1
    config = SLTrainConfig(sparsity=np.float32(0.5), alpha=torch.tensor(8.0), seed=np.uint8(3))
    assert (config.sparsity, config.alpha, config.seed) == (0.5, 8.0, 3)
    assert all(type(v) in (float, int) for v in (config.sparsity, config.alpha, config.seed))
    assert LowRankConfig(alpha=np.float64(2.0)).alpha == 2.0


def test_a_sparsity_that_keeps_every_layer_alive_still_transforms():
    model = fxsparse.transform(tiny_model("llama"), "sltrain", sparsity=1e-3, block_size=8, rank=4)
    values = [m.values.numel() for m in model.modules() if type(m).__name__ == "SLTrainLinear"]
    assert len(values) == 14 and min(values) == 1  # 16 x 48 x 1e-3 rounds to one non-zero
