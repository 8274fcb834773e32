"""Pass: choose which heads and FFN channels S²FT trains, as a :class:`~fxsparse.plan.Plan`.

:func:`select_units` is the pass (reads ``structure`` and ``model``, writes ``plan``);
:func:`choose_units` is the selection itself, a plain function of a Structure.

As in the S²FT paper, each role draws from *one pool across all chosen blocks*: for role ``r`` the
pool is every ``(block, unit)`` of the chosen blocks, and ``round(ratio * len(pool))`` of them are
picked, so blocks get different counts. Criteria:

- ``"random"``: uniform without replacement, from a ``torch.Generator`` seeded by ``seed`` and the
  role (adding a role does not change what another role gets);
- ``"weight"``: largest Frobenius norm of the unit's rows (q/k/v/gate/up) or columns (o/down);
- ``"activation"``: largest mean ``|activation|`` of the unit's input features (o/down) or output
  features (others), from forward hooks over the ``calibration`` batches;
- ``"gradient"``: largest norm of the gradient of the unit's weight slice after an LM-loss backward on
  the ``calibration`` batches (``labels`` from the batch, else ``input_ids``).

Ties are broken by (block, unit) order, so every criterion is deterministic. Scores are computed one
tensor per module (a norm per row or column, summed per unit by one gather), with one host copy per
role: no per-unit ``.item()`` (SmolLM2's down projections alone have 46k units, a 7B model 352k).

>>> import fxsparse
>>> from fxsparse.models import tiny_model
>>> structure = fxsparse.inspect(tiny_model("llama"))
>>> plan = choose_units(structure, {"o": 0.25, "down": 0.05}, seed=0)
>>> plan.count("o"), plan.count("down")       # 12 query heads, 160 channels in the pool
(3, 8)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fxsparse.layers import is_conv1d
from fxsparse.passes.manager import PassResult, fxpass
from fxsparse.plan import CRITERIA, ROLE_DIM, ROLES, Plan, arch_of, check_ratios, unit_count, unit_size
from fxsparse.structure import Block, Structure

__all__ = ["select_units", "choose_units"]


@fxpass(reads=("structure", "model"), writes=("plan",),
        options=("ratios", "select", "seed", "layers", "calibration", "plan"))
def select_units(
    structure: Structure,
    model: nn.Module | None,
    ratios: Mapping[str, float],
    select: str = "random",
    seed: int = 0,
    layers: Sequence[int] | None = None,
    calibration: Iterable[Mapping[str, Any]] | None = None,
    plan: Plan | None = None,
) -> PassResult:
    """Pick the trained units (:func:`choose_units`), or check a given ``plan`` against the structure.

    >>> import fxsparse
    >>> from fxsparse.models import tiny_model
    >>> model = tiny_model("llama")
    >>> result = select_units(structure=fxsparse.inspect(model), model=model, ratios={"o": 0.25})
    >>> result.outputs["plan"].count("o"), result.info
    (3, 'selected o=3 (random)')
    """
    if plan is not None:
        plan.check_structure(structure)
        counts = ", ".join(f"{r}={plan.count(r)}" for r in ROLES if plan.count(r))
        return PassResult(False, f"given plan: {counts or 'nothing'}", outputs={"plan": plan})
    plan = choose_units(structure, ratios, select=select, seed=seed,
                        layers=list(layers) if layers is not None else None, model=model, calibration=calibration)
    counts = ", ".join(f"{r}={plan.count(r)}" for r in ROLES if plan.count(r))
    return PassResult(False, f"selected {counts or 'nothing'} ({select})", outputs={"plan": plan})


def choose_units(
    structure: Structure,
    ratios: Mapping[str, float],
    select: str = "random",
    seed: int = 0,
    layers: Sequence[int] | None = None,
    model: nn.Module | None = None,
    calibration: Iterable[Mapping[str, Any]] | None = None,
) -> Plan:
    """Pick ``round(ratio * pool)`` units per role from one pool over the chosen blocks.

    ``ratios`` maps roles (``q, k, v, o, gate, up, down``) to fractions in [0, 1]; a nonzero ratio
    always selects at least one unit. ``layers`` restricts the pool to those block indices. ``model`` is
    needed by the ``weight``, ``activation`` and ``gradient`` criteria, ``calibration`` (a list of model
    input dicts) by the last two. Bad values raise ``ValueError`` naming them.
    """
    ratios = check_ratios(ratios)
    if select not in CRITERIA:
        raise ValueError(f"unknown selection criterion {select!r}; known: {list(CRITERIA)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    arch = arch_of(structure)
    blocks = _chosen_blocks(structure, layers)
    pools = {role: [(b.index, u) for b in blocks for u in range(unit_count(b, role))] for role in ratios}
    for role, ratio in ratios.items():
        if ratio > 0 and not pools[role]:
            raise ValueError(f"ratio for {role!r} is {ratio} but no chosen block has a {role!r} projection")
    wanted = {role: ratios[role] > 0 for role in ratios}
    if select != "random" and any(wanted.values()):
        if model is None:
            raise ValueError(f"select={select!r} needs the model (model=None given)")
        if select in ("activation", "gradient"):
            calibration = list(calibration or [])
            if not calibration:
                raise ValueError(f"select={select!r} needs calibration batches (calibration is empty)")
    scorer = {"weight": _weight_scores, "activation": _activation_scores, "gradient": _gradient_scores}
    roles = [role for role in ROLES if wanted.get(role)]
    scores = {}
    if select != "random" and roles:
        was_training = model.training
        model.eval()  # dropout off: scores must not depend on chance
        try:
            scores = scorer[select](model, blocks, roles, calibration)
        finally:
            model.train(was_training)

    units: dict[int, dict[str, list[int]]] = {}
    for role in roles:
        pool = pools[role]
        count = min(len(pool), max(1, math.floor(ratios[role] * len(pool) + 0.5)))
        if select == "random":
            generator = torch.Generator().manual_seed(seed * len(ROLES) + ROLES.index(role))
            order = torch.randperm(len(pool), generator=generator)[:count].tolist()
            chosen = [pool[i] for i in order]
        else:
            # a stable sort keeps pool order, i.e. (block, unit) order, among equal scores
            ranked = torch.sort(scores[role], descending=True, stable=True).indices[:count].tolist()
            chosen = [pool[i] for i in ranked]
        for b, u in chosen:
            units.setdefault(b, {}).setdefault(role, []).append(u)
    return Plan(units=units, ratios=dict(ratios), select=select, seed=seed, arch=arch,
                layers=None if layers is None else [b.index for b in blocks])


def _chosen_blocks(structure: Structure, layers: Sequence[int] | None) -> list[Block]:
    if layers is None:
        return list(structure.blocks)
    by_index = {block.index: block for block in structure.blocks}
    chosen = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or i not in by_index:
            raise ValueError(f"layer {i!r} is not a block index (blocks: 0..{len(structure.blocks) - 1})")
        if by_index[i] not in chosen:
            chosen.append(by_index[i])
    return sorted(chosen, key=lambda b: b.index)


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as (out, in), whatever its storage convention."""
    if hasattr(module, "merged_weight"):  # an S2FTLinear: its trainable block lives outside .weight
        return module.merged_weight()
    weight = module.weight.detach()
    return weight.t() if is_conv1d(module) else weight


def _unit_index(blocks: list[Block], role: str) -> list[tuple[str, torch.Tensor]]:
    """Per block with ``role``, in pool order: (module path, rows/columns of each unit as (units, size))."""
    groups = []
    for block in blocks:
        proj = block.projections().get(role)
        if proj is None:
            continue
        units, size = unit_count(block, role), unit_size(block, role)
        groups.append((proj.path, torch.tensor(proj.all_indices(units, size)).view(units, size)))
    return groups


def _unit_norms(squares: dict[str, torch.Tensor], groups: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """Norm of each unit's slice, from per-row (or per-column) sums of squares of its module."""
    parts = [squares[path][index.to(squares[path].device)].sum(-1).sqrt().cpu() for path, index in groups]
    return torch.cat(parts)


def _weight_scores(model, blocks, roles, calibration) -> dict[str, torch.Tensor]:
    scores = {}
    with torch.no_grad():
        for role in roles:
            dim = ROLE_DIM[role]
            groups = _unit_index(blocks, role)
            squares = {path: _dense_weight(model.get_submodule(path)).double().square().sum(1 - dim)
                       for path in dict.fromkeys(path for path, _ in groups)}
            scores[role] = _unit_norms(squares, groups)
    return scores


def _activation_scores(model, blocks, roles, calibration) -> dict[str, torch.Tensor]:
    # Mean |feature| per module and side, accumulated over every token of every batch.
    sums: dict[tuple[str, int], torch.Tensor] = {}
    counts: dict[tuple[str, int], int] = {}
    wanted = {(block.projections()[role].path, ROLE_DIM[role]) for block in blocks for role in roles
              if role in block.projections()}

    def make_hook(path: str, sides: list[int]):
        def hook(module, args, output):
            for side in sides:
                feature = args[0] if side == 1 else output
                flat = feature.detach().float().abs().reshape(-1, feature.shape[-1])
                key = (path, side)
                sums[key] = sums.get(key, 0) + flat.sum(0).double()
                counts[key] = counts.get(key, 0) + flat.shape[0]
        return hook

    paths: dict[str, list[int]] = {}
    for path, side in sorted(wanted):
        paths.setdefault(path, []).append(side)
    with contextlib.ExitStack() as stack:
        for path, sides in paths.items():
            handle = model.get_submodule(path).register_forward_hook(make_hook(path, sides))
            stack.callback(handle.remove)
        with torch.no_grad():
            for batch in calibration:
                model(**_model_inputs(batch))
    scores = {}
    for role in roles:
        side = ROLE_DIM[role]
        parts = []
        for path, index in _unit_index(blocks, role):
            total = sums[(path, side)]
            parts.append((total[index.to(total.device)].sum(-1) / (counts[(path, side)] * index.shape[1])).cpu())
        scores[role] = torch.cat(parts)
    return scores


def _gradient_scores(model, blocks, roles, calibration) -> dict[str, torch.Tensor]:
    paths = sorted({block.projections()[role].path for block in blocks for role in roles
                    if role in block.projections()})
    weights = {path: _scored_parameter(model.get_submodule(path)) for path in paths}
    params = list(model.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    try:
        # Only the scored weights need gradients: the rest of the backward is skipped.
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for w in weights.values():
            w.requires_grad_(True)
        for batch in calibration:
            inputs = _model_inputs(batch)
            inputs.setdefault("labels", inputs["input_ids"])
            loss = getattr(model(**inputs), "loss", None)
            if loss is None:
                raise ValueError("select='gradient' needs a model that returns .loss when given labels")
            loss.backward()
        grads = {path: _as_out_in(model.get_submodule(path), w.grad) for path, w in weights.items()}
    finally:
        for p, requires_grad, grad in saved:
            p.requires_grad_(requires_grad)
            p.grad = grad
    scores = {}
    for role in roles:
        dim = ROLE_DIM[role]
        groups = _unit_index(blocks, role)
        squares = {path: grads[path].double().square().sum(1 - dim) for path in dict.fromkeys(p for p, _ in groups)}
        scores[role] = _unit_norms(squares, groups)
    return scores


def _scored_parameter(module: nn.Module) -> nn.Parameter:
    if hasattr(module, "merged_weight"):
        raise ValueError(f"select='gradient' runs on the untransformed model; {type(module).__name__} found")
    return module.weight


def _as_out_in(module: nn.Module, grad: torch.Tensor | None) -> torch.Tensor:
    if grad is None:
        raise ValueError(f"select='gradient': no gradient reached the weight of {type(module).__name__}")
    return grad.t() if is_conv1d(module) else grad


def _model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError(f"calibration batches must be dicts of model inputs with 'input_ids', got {batch!r:.80}")
    return dict(batch)
