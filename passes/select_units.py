"""Pass: choose which heads and FFN channels S²FT trains, as a :class:`~fxsparse.plan.Plan`.

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

Ties are broken by (block, unit) order, so every criterion is deterministic.

>>> import fxsparse
>>> from fxsparse.models import tiny_model
>>> structure = fxsparse.inspect(tiny_model("llama"))
>>> plan = select_units(structure, {"o": 0.25, "down": 0.05}, seed=0)
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

from fxsparse.plan import CRITERIA, ROLE_DIM, ROLES, Plan, arch_of, unit_count, unit_size
from fxsparse.structure import Block, Structure

__all__ = ["select_units"]


def select_units(
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
    ratios = _check_ratios(ratios)
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
            ranked = sorted(range(len(pool)), key=lambda i: (-scores[role][i], pool[i]))
            chosen = [pool[i] for i in ranked[:count]]
        for b, u in chosen:
            units.setdefault(b, {}).setdefault(role, []).append(u)
    return Plan(units=units, ratios=dict(ratios), select=select, seed=seed, arch=arch,
                layers=None if layers is None else [b.index for b in blocks])


def _check_ratios(ratios: Mapping[str, float]) -> dict[str, float]:
    if not isinstance(ratios, Mapping):
        raise ValueError(f"ratios must be a dict of role -> fraction, got {ratios!r}")
    checked = {}
    for role, ratio in ratios.items():
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} in ratios; known: {list(ROLES)}")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
            raise ValueError(f"ratio for {role!r} must be in [0, 1], got {ratio!r}")
        checked[role] = float(ratio)
    return checked


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
    return weight.t() if type(module).__name__ == "Conv1D" else weight


def _unit_slices(blocks: list[Block], role: str) -> list[tuple[str, list[int]]]:
    """(module path, rows/columns) per pool entry, in pool order."""
    slices = []
    for block in blocks:
        proj = block.projections().get(role)
        size = unit_size(block, role)
        for u in range(unit_count(block, role)):
            slices.append((proj.path, proj.indices(u, size)))
    return slices


def _weight_scores(model, blocks, roles, calibration) -> dict[str, list[float]]:
    scores = {}
    with torch.no_grad():
        for role in roles:
            dim = ROLE_DIM[role]
            weights: dict[str, torch.Tensor] = {}
            values = []
            for path, idx in _unit_slices(blocks, role):
                if path not in weights:
                    weights[path] = _dense_weight(model.get_submodule(path)).float()
                part = weights[path].index_select(dim, torch.tensor(idx, device=weights[path].device))
                values.append(part.norm().item())
            scores[role] = values
    return scores


def _activation_scores(model, blocks, roles, calibration) -> dict[str, list[float]]:
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
                sums[key] = sums.get(key, 0) + flat.sum(0)
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
        scores[role] = [
            (sums[(path, side)][idx].sum() / (counts[(path, side)] * len(idx))).item()
            for path, idx in _unit_slices(blocks, role)
        ]
    return scores


def _gradient_scores(model, blocks, roles, calibration) -> dict[str, list[float]]:
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
        scores[role] = [
            grads[path].index_select(dim, torch.tensor(idx, device=grads[path].device)).float().norm().item()
            for path, idx in _unit_slices(blocks, role)
        ]
    return scores


def _scored_parameter(module: nn.Module) -> nn.Parameter:
    if hasattr(module, "merged_weight"):
        raise ValueError(f"select='gradient' runs on the untransformed model; {type(module).__name__} found")
    return module.weight


def _as_out_in(module: nn.Module, grad: torch.Tensor | None) -> torch.Tensor:
    if grad is None:
        raise ValueError(f"select='gradient': no gradient reached the weight of {type(module).__name__}")
    return grad.t() if type(module).__name__ == "Conv1D" else grad


def _model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError(f"calibration batches must be dicts of model inputs with 'input_ids', got {batch!r:.80}")
    return dict(batch)
