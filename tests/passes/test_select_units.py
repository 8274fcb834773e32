"""Plan (serialisable selection), choose_units (one pool across blocks, four criteria) and the select_units pass."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import fxsparse
from fxsparse.models import tiny_model
from fxsparse.passes.select_units import choose_units, select_units
from fxsparse.plan import Plan, arch_of
from fxsparse.structure import FFN, Attention, Block, Projection, Structure

ALL_ROLES = {"q": 0.5, "k": 0.5, "v": 0.25, "o": 0.3, "gate": 0.1, "up": 0.05, "down": 0.2}


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")
    return model, fxsparse.inspect(model)


def _calibration(model, n: int = 2, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    return [{"input_ids": torch.randint(0, vocab, (2, 8), generator=generator)} for _ in range(n)]


def _pool_sizes(structure, role):
    per_block = {"q": "num_heads", "o": "num_heads", "k": "num_kv_heads", "v": "num_kv_heads"}
    if role in per_block:
        return sum(getattr(b.attention, per_block[role]) for b in structure.blocks)
    return sum(b.ffn.channels for b in structure.blocks)


# ---------------------------------------------------------------- Plan


def _plan(**overrides) -> Plan:
    data = {"units": {"0": {"o": [3], "down": [17, 5]}, "1": {"k": [1]}}, "ratios": {"o": 0.1, "down": 0.02},
            "select": "random", "seed": 7,
            "arch": {"blocks": 2, "num_heads": 6, "num_kv_heads": 2, "head_dim": 8, "channels": 80}}
    data.update(overrides)
    return Plan.from_dict(data)


def test_plan_json_round_trip_and_normalisation():
    plan = _plan()
    assert plan.units == {0: {"o": [3], "down": [5, 17]}, 1: {"k": [1]}}
    text = plan.to_json()
    assert json.loads(text)["units"]["0"]["down"] == [5, 17]
    assert Plan.from_json(text) == plan
    assert Plan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()
    assert plan.count("down") == 2 and plan.selected(1, "k") == [1] and plan.selected(1, "o") == []


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"units": {"0": {"ffn": [1]}}}, "'ffn'"),
        ({"units": {"0": {"o": [6]}}}, r"\[6\]"),
        ({"units": {"0": {"k": [2]}}}, r"\[2\]"),
        ({"units": {"0": {"down": [80]}}}, r"\[80\]"),
        ({"units": {"0": {"down": [1, 1]}}}, "duplicate"),
        ({"units": {"2": {"o": [1]}}}, "block '2'"),
        ({"units": {"x": {"o": [1]}}}, "'x'"),
        ({"units": {"0": {"o": [1.0]}}}, "1.0"),
        ({"ratios": {"o": 1.5}}, "1.5"),
        ({"ratios": {"att": 0.1}}, "'att'"),
        ({"select": "magic"}, "'magic'"),
        ({"seed": "0"}, "seed"),
        ({"arch": {"blocks": 2}}, "num_heads"),
        ({"layers": [5]}, r"\[5\]"),
        ({"extra": 1}, "extra"),
    ],
)
def test_plan_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        _plan(**overrides)


def test_plan_from_json_rejects_garbage():
    with pytest.raises(ValueError, match="not JSON"):
        Plan.from_json("{units")
    with pytest.raises(ValueError, match="missing"):
        Plan.from_json("{}")


def test_module_indices_rows_columns_and_heads(llama):
    model, structure = llama
    plan = Plan(units={1: {"q": [2], "k": [1], "o": [0, 5], "down": [7]}}, ratios={}, select="random", seed=0,
                arch=arch_of(structure))
    idx = plan.module_indices(structure)
    assert idx[(1, "q")] == ("model.layers.1.self_attn.q_proj", 0, list(range(16, 24)))
    assert idx[(1, "k")] == ("model.layers.1.self_attn.k_proj", 0, list(range(8, 16)))
    assert idx[(1, "o")] == ("model.layers.1.self_attn.o_proj", 1, list(range(0, 8)) + list(range(40, 48)))
    assert idx[(1, "down")] == ("model.layers.1.mlp.down_proj", 1, [7])


def test_module_indices_follow_fused_projection_index():
    # A fused qkv module: q rows 0..11, k rows 12..15, v rows 16..19 (head_dim 4, 3 heads, 1 KV head).
    fused = "layers.0.qkv"
    attn = Attention(Projection(fused, tuple(range(12))), Projection(fused, tuple(range(12, 16))),
                     Projection(fused, tuple(range(16, 20))), Projection("layers.0.o"), 3, 1, 4)
    structure = Structure([Block(0, attn, FFN(Projection("layers.0.up"), None, Projection("layers.0.down"), 10))])
    plan = Plan(units={0: {"v": [0], "q": [2]}}, ratios={}, select="random", seed=0, arch=arch_of(structure))
    idx = plan.module_indices(structure)
    assert idx[(0, "v")] == (fused, 0, [16, 17, 18, 19])
    assert idx[(0, "q")] == (fused, 0, [8, 9, 10, 11])


def test_module_indices_reject_other_architecture(llama):
    _, structure = llama
    plan = _plan(arch={"blocks": 2, "num_heads": 9, "num_kv_heads": 3, "head_dim": 8, "channels": 80})
    with pytest.raises(ValueError, match="num_heads"):
        plan.module_indices(structure)


# ---------------------------------------------------------------- choose_units: random


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma", "gpt2"])
def test_random_counts_come_from_one_pool(arch):
    model = tiny_model(arch)
    structure = fxsparse.inspect(model)
    ratios = {k: v for k, v in ALL_ROLES.items() if structure.blocks[0].ffn.gate is not None or k != "gate"}
    plan = choose_units(structure, ratios, seed=3)
    for role, ratio in ratios.items():
        pool = _pool_sizes(structure, role)
        assert plan.count(role) == max(1, int(ratio * pool + 0.5)), role
    assert Plan.from_json(plan.to_json()) == plan
    assert plan.arch["blocks"] == len(structure.blocks)


def test_random_is_seeded_and_independent_per_role(llama):
    _, structure = llama
    a = choose_units(structure, {"o": 0.5, "down": 0.3}, seed=1)
    b = choose_units(structure, {"o": 0.5, "down": 0.3}, seed=1)
    c = choose_units(structure, {"o": 0.5, "down": 0.3}, seed=2)
    d = choose_units(structure, {"down": 0.3}, seed=1)
    assert a == b
    assert a.units != c.units
    assert [a.selected(i, "down") for i in range(2)] == [d.selected(i, "down") for i in range(2)]


def test_random_spreads_over_blocks_unevenly_over_many_seeds():
    structure = fxsparse.inspect(tiny_model("llama"))
    # One pool across blocks: per-block counts vary between seeds (a per-block quota would fix them).
    per_block = {tuple(len(choose_units(structure, {"down": 0.1}, seed=s).selected(i, "down")) for i in range(2))
                 for s in range(10)}
    assert len(per_block) > 1
    assert all(sum(counts) == 16 for counts in per_block)


def test_layers_restrict_the_pool(llama):
    _, structure = llama
    plan = choose_units(structure, {"o": 0.5, "gate": 0.25}, layers=[1])
    assert set(plan.units) == {1}
    assert plan.count("o") == 3 and plan.count("gate") == 20 and plan.layers == [1]


def test_zero_ratio_selects_nothing_and_tiny_ratio_selects_one(llama):
    _, structure = llama
    plan = choose_units(structure, {"o": 0.0, "down": 1e-6})
    assert plan.count("o") == 0 and plan.count("down") == 1
    full = choose_units(structure, {"k": 1.0})
    assert full.units == {0: {"k": [0, 1]}, 1: {"k": [0, 1]}}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ratios": {"mlp": 0.1}}, "'mlp'"),
        ({"ratios": {"o": 1.2}}, "1.2"),
        ({"ratios": {"o": -0.1}}, "-0.1"),
        ({"ratios": {"o": 0.1}, "select": "magnitude"}, "'magnitude'"),
        ({"ratios": {"o": 0.1}, "layers": [2]}, "layer 2"),
        ({"ratios": {"o": 0.1}, "select": "weight"}, "model"),
        ({"ratios": {"o": 0.1}, "select": "gradient", "model": "m"}, "calibration"),
        ({"ratios": {"o": 0.1}, "seed": 1.5}, "1.5"),
    ],
)
def test_bad_arguments_raise_value_error(llama, kwargs, match):
    model, structure = llama
    if kwargs.get("model") == "m":
        kwargs["model"] = model
    with pytest.raises(ValueError, match=match):
        choose_units(structure, **kwargs)


def test_role_missing_from_architecture_is_an_error():
    structure = fxsparse.inspect(tiny_model("gpt2"))
    with pytest.raises(ValueError, match="'gate'"):
        choose_units(structure, {"gate": 0.1})


# ---------------------------------------------------------------- choose_units: scored criteria


def _brute_force_top(scores: dict[tuple[int, int], float], count: int) -> set[tuple[int, int]]:
    return set(sorted(scores, key=lambda key: (-scores[key], key))[:count])


def _chosen(plan: Plan, role: str) -> set[tuple[int, int]]:
    return {(b, u) for b, roles in plan.units.items() for u in roles.get(role, [])}


def test_weight_criterion_picks_largest_norms(llama):
    model, structure = llama
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[:, 8 * 4:8 * 5] *= 100  # head 4 of block 1
        model.model.layers[0].mlp.up_proj.weight[33] *= 100  # channel 33 of block 0
    plan = choose_units(structure, {"o": 1 / 12, "up": 1 / 160, "down": 0.1}, select="weight", model=model)
    assert plan.units[1]["o"] == [4] and plan.units[0]["up"] == [33]
    expected = {(b, c): model.model.layers[b].mlp.down_proj.weight[:, c].norm().item()
                for b in range(2) for c in range(80)}
    assert _chosen(plan, "down") == _brute_force_top(expected, 16)


def test_activation_criterion_picks_loudest_features(llama):
    model, structure = llama
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[50] *= 1000  # down's input channel 50 gets loud
        model.model.layers[1].self_attn.k_proj.weight[8:16] *= 1000  # KV head 1 output of block 1
    calibration = _calibration(model)
    plan = choose_units(structure, {"down": 1 / 160, "k": 0.25}, select="activation", model=model,
                        calibration=calibration)
    assert plan.units[0]["down"] == [50] and plan.units[1]["k"] == [1]

    # An independent computation of the same statistic for q (output features, head-sized units).
    totals = {}
    for b in range(2):
        proj = model.model.layers[b].self_attn.q_proj
        outs: list[torch.Tensor] = []
        handle = proj.register_forward_hook(lambda m, a, o, outs=outs: outs.append(o.detach().abs()))
        with torch.no_grad():
            for batch in calibration:
                model(**batch)
        handle.remove()
        mean = torch.cat([o.reshape(-1, o.shape[-1]) for o in outs]).mean(0)
        totals.update({(b, h): mean[8 * h:8 * (h + 1)].mean().item() for h in range(6)})
    plan_q = choose_units(structure, {"q": 0.25}, select="activation", model=model, calibration=calibration)
    assert _chosen(plan_q, "q") == _brute_force_top(totals, 3)


def test_gradient_criterion_matches_a_plain_backward_and_restores_the_model(llama):
    model, structure = llama
    model = copy.deepcopy(model)
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 2 == 0)  # an arbitrary pattern the pass must restore
    flags = [p.requires_grad for p in model.parameters()]
    calibration = _calibration(model, n=2, seed=5)
    plan = choose_units(structure, {"v": 0.5, "gate": 0.1}, select="gradient", model=model,
                        calibration=calibration)
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags

    reference = copy.deepcopy(model)
    for p in reference.parameters():
        p.requires_grad_(True)
    for batch in calibration:
        reference(**batch, labels=batch["input_ids"]).loss.backward()
    v_scores = {(b, h): reference.model.layers[b].self_attn.v_proj.weight.grad[8 * h:8 * (h + 1)].norm().item()
                for b in range(2) for h in range(2)}
    gate_scores = {(b, c): reference.model.layers[b].mlp.gate_proj.weight.grad[c].norm().item()
                   for b in range(2) for c in range(80)}
    assert _chosen(plan, "v") == _brute_force_top(v_scores, 2)
    assert _chosen(plan, "gate") == _brute_force_top(gate_scores, 16)


def test_scored_criteria_are_deterministic(llama):
    model, structure = llama
    calibration = _calibration(model)
    for select in ("weight", "activation", "gradient"):
        a = choose_units(structure, {"o": 0.3, "down": 0.1}, select=select, model=model, calibration=calibration)
        b = choose_units(structure, {"o": 0.3, "down": 0.1}, select=select, model=model, calibration=calibration)
        assert a == b, select


def test_weight_criterion_on_conv1d_and_fused_qkv():
    model = tiny_model("gpt2")
    structure = fxsparse.inspect(model)
    attention = structure.blocks[1].attention
    head_dim = attention.head_dim
    v_rows = attention.v.indices(4, head_dim)  # output features of the fused c_attn that hold V head 4
    with torch.no_grad():
        block = model.transformer.h[1].attn
        block.c_proj.weight[2 * head_dim:3 * head_dim] *= 100  # Conv1D stores (in, out): O's input head 2
        block.c_attn.weight[:, v_rows] *= 100
    plan = choose_units(structure, {"o": 1 / 12, "v": 1 / 12}, select="weight", model=model)
    assert plan.units == {1: {"o": [2], "v": [4]}}


def test_scoring_makes_no_host_sync_per_unit(llama, monkeypatch):
    """One host copy per role, not one ``.item()`` per unit (SmolLM2's down projections have 46k units)."""
    model, structure = llama
    calls = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: calls.append(1) or real_item(self))
    calibration = _calibration(model)
    for select in ("weight", "activation", "gradient"):
        choose_units(structure, {"o": 0.3, "down": 0.1}, select=select, model=model, calibration=calibration)
    assert calls == []


# ---------------------------------------------------------------- the select_units pass


def test_pass_selects_or_checks_a_given_plan(llama):
    model, structure = llama
    result = select_units(structure=structure, model=model, ratios={"o": 0.5}, seed=3)
    assert not result.modified and result.outputs["plan"] == choose_units(structure, {"o": 0.5}, seed=3)
    given = _plan(arch=arch_of(structure))
    assert select_units(structure=structure, model=model, ratios={"o": 0.5}, plan=given).outputs["plan"] is given
    other = _plan(arch={**arch_of(structure), "num_kv_heads": 3})
    with pytest.raises(ValueError, match="plan was made for another architecture.*num_kv_heads"):
        select_units(structure=structure, model=model, ratios={"o": 0.5}, plan=other)


# ---------------------------------------------------------------- blocks of different sizes


def _ffn_block(index, channels, part_of=None):
    ffn = FFN(up=Projection(f"l{index}.up"), gate=None, down=Projection(f"l{index}.down"), channels=channels)
    attention = Attention(*(Projection(f"l{index}.{r}") for r in "qkvo"), num_heads=6, num_kv_heads=2, head_dim=8)
    return Block(index, attention if part_of is None else None, ffn, part_of=part_of)


def test_blocks_of_different_sizes_select_per_block():
    """A dense first layer (80 channels), then a shared expert (56) with a routed expert (24) part of it: one
    pool over every block's own channels; the plan's arch records the sizes per block and checks them."""
    structure = Structure(blocks=[_ffn_block(0, 80), _ffn_block(1, 56), _ffn_block(2, 24, part_of=1)])
    arch = arch_of(structure)
    assert arch["channels"] == 80 and arch["sizes"] == [[6, 2, 8, 80], [6, 2, 8, 56], [0, 0, 0, 24]]
    plan = choose_units(structure, {"down": 1.0, "o": 0.5}, seed=0)
    assert [len(plan.selected(b, "down")) for b in range(3)] == [80, 56, 24]
    assert plan.count("o") == 6 and not plan.selected(2, "o")
    assert Plan.from_json(plan.to_json()) == plan
    with pytest.raises(ValueError, match=r"units \[30\] of block 2 role 'down' outside \[0, 24\)"):
        Plan(units={2: {"down": [30]}}, ratios={}, select="random", seed=0, arch=arch)
    uniform = Structure(blocks=[_ffn_block(0, 80), _ffn_block(1, 80)])
    with pytest.raises(ValueError, match="plan was made for another architecture.*sizes"):
        plan.check_structure(uniform)
