"""The S²FT recipe: select units, co-permute them together, replace projections, fuse gated FFNs.

Passes, in order (each a function of the shared :class:`S2FTState`):

1. ``select`` — :func:`fxsparse.passes.select_units.select_units` picks heads/channels (a Plan);
2. ``permute`` — :mod:`fxsparse.passes.permute_coupled` folds a co-permutation into the weights so each
   projection's selected units are contiguous (exact under GQA; see that module);
3. ``replace`` — each selected projection becomes an :class:`~fxsparse.layers.s2ft.S2FTLinear` whose
   trainable block is a real ``nn.Parameter``; everything else is frozen;
4. ``fuse`` — gated FFNs run through one autograd function that saves gate and up only.

``merge`` reverses all of it: plain ``nn.Linear`` (or ``Conv1D``) modules, the original module objects
around them, the permutation undone, the trained values in place.

>>> import fxsparse, torch
>>> from fxsparse.models import tiny_model
>>> model = tiny_model("llama")
>>> x = torch.arange(10).reshape(1, 10)
>>> before = model(x).logits
>>> model = fxsparse.transform(model, "s2ft", ratios={"o": 0.25, "down": 0.1}, seed=0)
>>> bool(torch.allclose(model(x).logits, before, atol=1e-5))
True
>>> model = fxsparse.merge(model)
>>> type(model.model.layers[0].self_attn.o_proj).__name__
'Linear'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fxsparse.layers.fused_ffn import FusedGatedFFN
from fxsparse.layers.s2ft import S2FTLinear
from fxsparse.passes.fuse_gated_ffn import fuse_gated_ffn
from fxsparse.passes.manager import PassManager, PassResult
from fxsparse.passes.permute_coupled import (
    BlockPermutation,
    apply_permutations,
    permuted_module_indices,
    plan_permutations,
)
from fxsparse.passes.select_units import select_units
from fxsparse.plan import CRITERIA, ROLES, Plan
from fxsparse.recipes import register_recipe
from fxsparse.structure import Structure

__all__ = ["S2FTConfig", "S2FTRecipe", "S2FTState", "DEFAULT_RATIOS", "s2ft_state"]

# The paper's LLaMA-2 setting: 5.2% of O's heads and 2% of down's channels.
DEFAULT_RATIOS = {"o": 0.052, "down": 0.02}


@dataclass(frozen=True)
class S2FTConfig:
    """Options of ``fxsparse.transform(model, "s2ft", **options)``.

    ``ratios``: fraction of units trained per projection (keys q, k, v, o, gate, up, down); ``select``:
    random | weight | activation | gradient; ``calibration``: batches for the data-driven criteria;
    ``layers``: which blocks may get units (default all); ``plan``: reuse a Plan (or its dict) instead of
    selecting; ``fuse_ffn``: run gated FFNs through the fused op; ``verify``: check after every pass
    that the model still computes the same logits on the example input.
    """

    ratios: Mapping[str, float] | None = None
    select: str = "random"
    seed: int = 0
    layers: Sequence[int] | None = None
    calibration: Sequence[Mapping[str, Any]] | None = None
    plan: Plan | Mapping[str, Any] | None = None
    fuse_ffn: bool = True
    verify: bool = False

    def __post_init__(self):
        ratios = dict(DEFAULT_RATIOS if self.ratios is None else self.ratios)
        for role, ratio in ratios.items():
            if role not in ROLES:
                raise ValueError(f"unknown projection {role!r} in ratios; known: {list(ROLES)}")
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
                raise ValueError(f"ratio for {role!r} must be in [0, 1], got {ratio!r}")
        object.__setattr__(self, "ratios", ratios)
        if self.select not in CRITERIA:
            raise ValueError(f"unknown selection criterion select={self.select!r}; known: {list(CRITERIA)}")
        if self.select in ("activation", "gradient") and not self.calibration and self.plan is None:
            raise ValueError(f"select={self.select!r} needs calibration batches (calibration=[{{'input_ids': ...}}])")
        if self.plan is not None and not isinstance(self.plan, Plan):
            object.__setattr__(self, "plan", Plan.from_dict(dict(self.plan)))


@dataclass
class S2FTState:
    """What the passes share and what ``merge``/adapters need later (kept as ``model._fxsparse_s2ft``)."""

    model: nn.Module
    structure: Structure
    config: S2FTConfig
    example_inputs: Any = None
    plan: Plan | None = None
    perms: dict[int, BlockPermutation] = field(default_factory=dict)
    # path -> (dim, rows after permutation, original row of each)
    replaced: dict[str, tuple[int, list[int], list[int]]] = field(default_factory=dict)
    fused_owners: dict[str, nn.Module] = field(default_factory=dict)
    requires_grad: dict[str, bool] = field(default_factory=dict)


def s2ft_state(model: nn.Module) -> S2FTState:
    state = getattr(model, "_fxsparse_s2ft", None)
    if state is None:
        raise ValueError("model is not transformed with the s2ft recipe")
    return state


def _select(state: S2FTState) -> PassResult:
    cfg = state.config
    if cfg.plan is not None:
        cfg.plan.check_structure(state.structure)
        state.plan = cfg.plan
        return PassResult(False, f"reused plan ({sum(len(r) for r in cfg.plan.units.values())} roles)")
    state.plan = select_units(state.structure, cfg.ratios, select=cfg.select, seed=cfg.seed,
                              layers=list(cfg.layers) if cfg.layers is not None else None,
                              model=state.model, calibration=cfg.calibration)
    counts = ", ".join(f"{r}={state.plan.count(r)}" for r in ROLES if state.plan.count(r))
    return PassResult(False, f"selected {counts or 'nothing'}")


def _permute(state: S2FTState) -> PassResult:
    state.perms = plan_permutations(state.structure, state.plan)
    return apply_permutations(state.model, state.structure, state.perms)


def _replace(state: S2FTState) -> PassResult:
    by_path: dict[str, tuple[int, list[int], list[int]]] = {}
    for (block, role), (path, dim, rows, origin) in permuted_module_indices(
            state.structure, state.plan, state.perms).items():
        if path in by_path:
            # fused projections: q and v rows of one qkv linear train as one block of rows
            prev_dim, prev_rows, prev_origin = by_path[path]
            if prev_dim != dim:
                raise ValueError(f"{path} would train rows and columns at once (block {block}, {role})")
            pairs = sorted(set(zip(prev_rows + rows, prev_origin + origin)))
            by_path[path] = (dim, [p for p, _ in pairs], [o for _, o in pairs])
        else:
            by_path[path] = (dim, rows, origin)
    state.requires_grad = {name: p.requires_grad for name, p in state.model.named_parameters()}
    for param in state.model.parameters():
        param.requires_grad_(False)
    for path, (dim, rows, origin) in by_path.items():
        layer = S2FTLinear.from_linear(state.model.get_submodule(path), dim=dim, index=rows)
        state.model.set_submodule(path, layer)
        state.replaced[path] = (dim, rows, origin)
    return PassResult(bool(by_path), f"replaced {len(by_path)} projections")


def _fuse(state: S2FTState) -> PassResult:
    if not state.config.fuse_ffn:
        return PassResult(False, "fusion off")
    owners = {}
    for block in state.structure.blocks:
        if block.ffn is not None and block.ffn.gate is not None:
            owner = block.ffn.down.path.rpartition(".")[0]
            if owner:
                owners[owner] = state.model.get_submodule(owner)
    result = fuse_gated_ffn(state.model, state.structure)
    state.fused_owners = {p: m for p, m in owners.items()
                          if isinstance(state.model.get_submodule(p), FusedGatedFFN)}
    return result


class S2FTRecipe:
    """Registered as ``"s2ft"``; see the module docstring."""

    name = "s2ft"
    config_cls = S2FTConfig
    passes = (_select, _permute, _replace, _fuse)

    def apply(self, model: nn.Module, structure: Structure, config: S2FTConfig, example_inputs=None) -> nn.Module:
        state = S2FTState(model=model, structure=structure, config=config, example_inputs=example_inputs)
        verify = _logit_checker(model, example_inputs) if config.verify else None
        PassManager(self.passes, verify=verify).run(state)
        model._fxsparse_s2ft = state
        return model

    @torch.no_grad()
    def merge(self, model: nn.Module) -> nn.Module:
        state = s2ft_state(model)
        for owner_path, original in state.fused_owners.items():
            fused = model.get_submodule(owner_path)
            for name in fused._names:
                setattr(original, name, getattr(fused, name))
            model.set_submodule(owner_path, original)
        for path in state.replaced:
            model.set_submodule(path, model.get_submodule(path).to_linear())
        apply_permutations(model, state.structure, state.perms, inverse=True)
        for name, param in model.named_parameters():
            param.requires_grad_(state.requires_grad.get(name, True))
        del model._fxsparse_s2ft
        return model


def _logit_checker(model: nn.Module, example_inputs):
    """A verify hook for the pass manager: the logits on the example input must not change."""
    from fxsparse.capture import _normalise_inputs

    args, kwargs = _normalise_inputs(model, example_inputs)
    with torch.no_grad():
        reference = _logits(model(*args, **kwargs))

    def verify(state: S2FTState) -> None:
        with torch.no_grad():
            got = _logits(state.model(*args, **kwargs))
        scale = reference.abs().max().clamp_min(1e-12)
        error = ((got - reference).abs().max() / scale).item()
        if error > 1e-5:
            raise AssertionError(f"model output changed (max relative error {error:.2e})")

    return verify


def _logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


register_recipe(S2FTRecipe())
