"""The S²FT recipe: select units, co-permute them together, replace projections, check the function.

Passes, in order (``python -m fxsparse.passes --list`` prints what each reads and writes):

1. ``capture_graph``, ``find_structure`` — the graph and the heads/channels in it;
2. ``record_reference`` — the small example's outputs before anything changes (``verify``);
3. ``select_units`` — which heads/channels train (a Plan; or the given ``plan``, checked);
4. ``permute_coupled`` — a co-permutation folded into the weights so each projection's selected units
   are contiguous (exact under GQA);
5. ``replace_s2ft`` — each selected projection becomes an :class:`~fxsparse.layers.s2ft.S2FTLinear`
   whose trainable block is a real ``nn.Parameter``; everything else is frozen;
6. ``recompute_gated_act`` — gated FFNs keep gate and up for backward and recompute ``act(gate)``;
7. ``check_function`` — the transformed model must compute what the original did, attention by
   attention and FFN by FFN, within the tolerance of the model's dtype; if not, the error names the
   unit and ``transform`` leaves the model exactly as it was.

``merge`` reverses all of it: plain ``nn.Linear`` (or ``Conv1D``) modules, the original module objects
around them, the permutation undone, the trained values in place.

>>> import fxsparse, torch
>>> from fxsparse.models import tiny_model
>>> model = tiny_model("llama")
>>> x = torch.arange(10).reshape(1, 10)
>>> before = model(x).logits
>>> model = fxsparse.transform(model, S2FTConfig(ratios={"o": 0.25, "down": 0.1}, seed=0))
>>> bool(torch.allclose(model(x).logits, before, atol=1e-5))
True
>>> model = fxsparse.merge(model)
>>> type(model.model.layers[0].self_attn.o_proj).__name__
'Linear'
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fxsparse.passes.capture_graph import capture_graph
from fxsparse.passes.check_function import check_function
from fxsparse.passes.find_structure import find_structure
from fxsparse.passes.permute_coupled import BlockPermutation, apply_permutations, permute_coupled
from fxsparse.passes.recompute_gated_act import recompute_gated_act
from fxsparse.passes.record_reference import record_reference
from fxsparse.passes.replace_s2ft import replace_s2ft
from fxsparse.passes.select_units import select_units
from fxsparse.plan import CRITERIA, Plan, check_ratios
from fxsparse.recipes import Recipe, check_seed, lift_save_refusal, register_recipe
from fxsparse.structure import Structure

__all__ = ["S2FTConfig", "S2FTState", "S2FT", "DEFAULT_RATIOS", "s2ft_state", "merge_s2ft"]

# The paper's LLaMA-2 setting: 5.2% of O's heads and 2% of down's channels.
DEFAULT_RATIOS = {"o": 0.052, "down": 0.02}


def _check_layers(layers: Any) -> tuple[int, ...] | None:
    """None (all blocks), or block indices as a tuple; a single int means that one block."""
    if layers is None:
        return None
    items = [layers] if isinstance(layers, numbers.Integral) and not isinstance(layers, bool) else layers
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable):
        raise ValueError(f"layers={layers!r} must be None (all blocks), a block index or a list of block indices")
    items = list(items)
    bad = [i for i in items if isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0]
    if not items or bad:
        raise ValueError(f"layers={layers!r} must be None (all blocks), a block index or a non-empty list of "
                         f"non-negative block indices" + (f"; not indices: {bad!r}" if bad else ""))
    return tuple(int(i) for i in items)


@dataclass(frozen=True)
class S2FTConfig:
    """Options of ``fxsparse.transform(model, "s2ft", **options)`` (or ``transform(model, S2FTConfig(...))``).

    ``ratios``: fraction of units trained per projection (keys q, k, v, o, gate, up, down; numpy/torch
    scalars are taken as floats); ``seed``: an int in [0, 2**63); ``select``:
    random | weight | activation | gradient; ``calibration``: batches for the data-driven criteria (used
    during ``transform`` only, not kept); ``layers``: which blocks may get units (default all; one int
    means that block); ``plan``: reuse a Plan (or its dict) instead of selecting; ``recompute_act``: gated FFNs
    recompute ``act(gate)`` in backward, saving one (tokens x channels) tensor per block for some elementwise
    work; ``verify``: check that the transformed model computes the same function on the small example
    (on by default; see ``fxsparse.passes.check_function`` for the tolerances per dtype).
    """

    ratios: Mapping[str, float] | None = None
    select: str = "random"
    seed: int = 0
    layers: Sequence[int] | None = None
    calibration: Sequence[Mapping[str, Any]] | None = None
    plan: Plan | Mapping[str, Any] | None = None
    recompute_act: bool = True
    verify: bool = True

    def __post_init__(self):
        ratios = check_ratios(DEFAULT_RATIOS if self.ratios is None else self.ratios)
        object.__setattr__(self, "ratios", ratios)
        object.__setattr__(self, "seed", check_seed(self.seed))
        object.__setattr__(self, "layers", _check_layers(self.layers))
        if self.select not in CRITERIA:
            raise ValueError(f"unknown selection criterion select={self.select!r}; known: {list(CRITERIA)}")
        if self.select in ("activation", "gradient") and not self.calibration and self.plan is None:
            raise ValueError(f"select={self.select!r} needs calibration batches (calibration=[{{'input_ids': ...}}])")
        if self.plan is not None and not isinstance(self.plan, Plan):
            object.__setattr__(self, "plan", Plan.from_dict(dict(self.plan)))
        for flag in ("recompute_act", "verify"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")


@dataclass
class S2FTState:
    """What ``merge`` and adapters need after ``transform`` (kept as ``model._fxsparse_s2ft``).

    Only the selection and the bookkeeping to undo it: no config, calibration batches or example inputs.
    """

    structure: Structure
    plan: Plan
    perms: dict[int, BlockPermutation]
    replaced: dict[str, tuple[int, list[int], list[int]]]  # path -> (dim, rows after permutation, original rows)
    recomputed: dict[str, nn.Module]  # owner path -> the original gated FFN module
    requires_grad: dict[str, bool]  # parameter name -> flag before transform
    # path -> the block's values at transform time (the base values it replaced; CPU): what export_lora subtracts
    base_blocks: dict[str, torch.Tensor] = field(default_factory=dict)


def s2ft_state(model: nn.Module) -> S2FTState:
    state = getattr(model, "_fxsparse_s2ft", None)
    if state is None:
        raise ValueError("model is not transformed with the s2ft recipe")
    return state


def _finish(model: nn.Module, context: Mapping[str, Any]) -> None:
    model._fxsparse_s2ft = S2FTState(
        structure=context["structure"], plan=context["plan"], perms=context["perms"],
        replaced=context["replaced"], recomputed=context["recomputed"],
        requires_grad=context["requires_grad_before"],
        base_blocks={path: model.get_submodule(path).block.detach().to("cpu", copy=True)
                     for path in context["replaced"] if not model.get_submodule(path).block.is_meta},
    )


@torch.no_grad()
def merge_s2ft(model: nn.Module) -> nn.Module:
    """Write the trained blocks back, undo the permutation and the module swaps (in place)."""
    state = s2ft_state(model)
    for owner_path, original in state.recomputed.items():
        recomputing = model.get_submodule(owner_path)
        for name in recomputing._names:
            setattr(original, name, getattr(recomputing, name))
        model.set_submodule(owner_path, original)
    for path in state.replaced:
        model.set_submodule(path, model.get_submodule(path).to_linear())
    apply_permutations(model, state.structure, state.perms, inverse=True)
    for name, param in model.named_parameters():
        param.requires_grad_(state.requires_grad.get(name, True))
    del model._fxsparse_s2ft
    lift_save_refusal(model)
    return model


def _check_calibration(model: nn.Module, config: S2FTConfig) -> None:
    """Calibration token ids must be integer tensors inside the model's vocabulary (not a raw IndexError)."""
    if not config.calibration:
        return
    embeddings = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    vocab = getattr(embeddings, "num_embeddings", None)
    for number, batch in enumerate(config.calibration):
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
        if ids is None:
            continue  # select_units names a batch without input_ids
        if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype.is_complex \
                or ids.dtype == torch.bool:
            kind = f"a {ids.dtype} tensor" if isinstance(ids, torch.Tensor) else f"a {type(ids).__name__}"
            raise ValueError(f"calibration batch {number}: input_ids must be an integer tensor, got {kind}")
        if ids.numel() and (int(ids.min()) < 0 or (vocab is not None and int(ids.max()) >= vocab)):
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise ValueError(f"calibration batch {number}: input_ids holds token id {bad}, outside the model's "
                             f"vocabulary [0, {vocab})")


S2FT = register_recipe(Recipe(
    name="s2ft",
    config_cls=S2FTConfig,
    passes=(capture_graph, find_structure, record_reference, select_units, permute_coupled, replace_s2ft,
            recompute_gated_act, check_function),
    merge=merge_s2ft,
    finish=_finish,
    check=_check_calibration,
))
