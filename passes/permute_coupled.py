"""Pass: co-permute heads and FFN channels so each selected set of units is contiguous.

Permuting the heads of an attention block consistently — Q, K, V output rows and O input columns — or
the channels of an FFN — gate/up output rows and down input columns — leaves the function unchanged.
S²FT uses that to gather the trainable units of each projection into one contiguous range, so its
layer reads the trainable part of the input as a slice (a view) instead of a gather.

GQA: query head ``h`` attends with KV head ``h // groups``. A query head may move only within its KV
group unless the whole group moves, so a head permutation here is "an order of KV groups, and an order
of query heads inside each group". Any selection of KV heads (k, v) can be made contiguous; a selection
of query heads (q, o) can when at most two KV groups are partly selected (one partial group is put
before the fully selected groups with its selected heads last, the other after them with its selected
heads first). Beyond that no exact permutation exists, and the layer gathers the remaining columns
(``S2FTLinear`` handles both). :func:`plan_permutations` picks, per block, the candidate order that
leaves the fewest non-contiguous runs.

Which roles move together is read off the Structure records: an ``Attention`` couples q, k, v rows and
o columns (query heads for q/o, KV heads for k/v), an ``FFN`` couples gate/up rows and down columns.
Only the rows/columns that actually move are gathered; a role whose order is the identity is left alone
and not counted as moved. The heads of an attention (the channels of an FFN) with ``fixed_order`` (something
outside the projections acts per head or per channel) never move: the selected ones are trained where they
are, as a gathered block.

>>> from fxsparse.models import tiny_model
>>> import fxsparse, torch
>>> model = tiny_model("llama")
>>> structure = fxsparse.inspect(model)
>>> perms = {0: BlockPermutation(heads=(5, 4, 3, 2, 1, 0), kv_heads=(1, 0), channels=None)}
>>> x = torch.arange(12).reshape(1, 12) % 96
>>> before = model(x).logits
>>> apply_permutations(model, structure, perms)
4
>>> torch.allclose(model(x).logits, before, atol=1e-5)
True
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fxsparse.passes.manager import PassResult, fxpass
from fxsparse.plan import CHANNEL_ROLES, HEAD_ROLES, KV_ROLES, ROLE_DIM, Plan, unit_size
from fxsparse.structure import Block, Projection, Structure

__all__ = ["BlockPermutation", "permute_coupled", "plan_permutations", "apply_permutations",
           "permuted_module_indices", "runs"]


@dataclass(frozen=True)
class BlockPermutation:
    """New position ``i`` holds old unit ``perm[i]``; ``None`` leaves that kind of unit in place."""

    heads: tuple[int, ...] | None = None  # query heads
    kv_heads: tuple[int, ...] | None = None
    channels: tuple[int, ...] | None = None


def runs(positions: Iterable[int]) -> int:
    """Number of maximal contiguous runs in a set of positions (0 for an empty set)."""
    values = sorted(positions)
    return sum(1 for i, v in enumerate(values) if i == 0 or v != values[i - 1] + 1)


def _inverse(perm: Sequence[int]) -> list[int]:
    inv = [0] * len(perm)
    for new, old in enumerate(perm):
        inv[old] = new
    return inv


def _gray_rank(bits: tuple[bool, ...]) -> int:
    """Rank of a membership pattern in the reflected Gray order: sorting by it keeps the most significant
    roles' members contiguous (the first two roles always, later ones with few runs)."""
    code = 0
    for bit in bits:
        code = (code << 1) | int(bit)
    rank, shift = code, 1
    while (code >> shift) > 0:  # Gray -> binary
        rank ^= code >> shift
        shift += 1
    return rank


def _channel_order(channels: int, sets: list[set[int]]) -> tuple[int, ...] | None:
    if not any(sets):
        return None
    return tuple(sorted(range(channels), key=lambda c: (_gray_rank(tuple(c in s for s in sets)), c)))


def _head_candidates(heads: int, kv_heads: int, query_sets: list[set[int]], kv_sets: list[set[int]]):
    """Candidate (kv order, query order) pairs for one block.

    Group orders: every order when there are few KV groups (SmolLM2 has 3), else a few sorted ones;
    inside a group, a partly selected group puts its selected heads towards its selected neighbour.
    """
    groups = heads // kv_heads
    members = [list(range(j * groups, (j + 1) * groups)) for j in range(kv_heads)]
    primary = next((s for s in query_sets if s), set())
    counts = [sum(h in primary for h in members[j]) for j in range(kv_heads)]

    def expand(order: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        query: list[int] = []
        for pos, j in enumerate(order):
            after = pos + 1 < len(order) and counts[order[pos + 1]] > 0
            before = pos > 0 and counts[order[pos - 1]] > 0
            selected_last = after or not before  # selected heads face the selected neighbour
            query += sorted(members[j], key=lambda h: ((h in primary) == selected_last, h))
        return tuple(order), tuple(query)

    if kv_heads <= 5:
        yield from (expand(order) for order in itertools.permutations(range(kv_heads)))
        return
    kv_bits = [tuple(j in s for s in kv_sets) for j in range(kv_heads)]
    keys = [
        lambda j: (_gray_rank(kv_bits[j]), counts[j], j),
        lambda j: (_gray_rank((counts[j] > 0, *kv_bits[j])), counts[j], j),
        lambda j: (_gray_rank((counts[j] == groups, counts[j] > 0, *kv_bits[j])), j),
        lambda j: j,
    ]
    for key in keys:
        yield expand(sorted(range(kv_heads), key=key))


def _score(perm: Sequence[int], sets: list[set[int]]) -> int:
    inv = _inverse(perm)
    return sum(max(runs(inv[u] for u in s) - 1, 0) for s in sets)


def plan_permutations(structure: Structure, plan: Plan) -> dict[int, BlockPermutation]:
    """One :class:`BlockPermutation` per block with selected units (see the module docstring)."""
    plan.check_structure(structure)
    result: dict[int, BlockPermutation] = {}
    for block in structure.blocks:
        selected = plan.units.get(block.index, {})
        if not selected:
            continue
        heads = kv = channels = None
        if block.attention is not None and not block.attention.fixed_order and any(
                r in selected for r in HEAD_ROLES + KV_ROLES):
            a = block.attention
            query_sets = [set(selected.get(r, [])) for r in ("o", "q")]
            kv_sets = [set(selected.get(r, [])) for r in ("v", "k")]
            best = None
            for kv_order, query_order in _head_candidates(a.num_heads, a.num_kv_heads, query_sets, kv_sets):
                score = _score(query_order, query_sets) + _score(kv_order, kv_sets)
                if best is None or score < best[0]:
                    best = (score, kv_order, query_order)
            _, kv, heads = best
            groups = a.kv_groups
            assert all(heads[i] // groups == kv[i // groups] for i in range(a.num_heads)), "GQA order broken"
        if block.ffn is not None and not block.ffn.fixed_order and any(r in selected for r in CHANNEL_ROLES):
            sets = [set(selected.get(r, [])) for r in ("down", "up", "gate")]
            channels = _channel_order(block.ffn.channels, sets)
        result[block.index] = BlockPermutation(heads=heads, kv_heads=kv, channels=channels)
    return result


def _role_perm(perm: BlockPermutation, role: str) -> tuple[int, ...] | None:
    if role in HEAD_ROLES:
        return perm.heads
    if role in KV_ROLES:
        return perm.kv_heads
    return perm.channels


def _dense_view(module: nn.Module, conv1d: bool) -> torch.Tensor:
    """The (out, in) view of a Linear's or Conv1D's weight (writes go through to the module)."""
    return module.weight.data.t() if conv1d else module.weight.data


@torch.no_grad()
def _permute_projection(module: nn.Module, proj: Projection, role: str, perm: Sequence[int], size: int) -> bool:
    """Fold ``perm`` (new unit i holds old unit ``perm[i]``) into ``module``; False if it is the identity."""
    positions = proj.all_indices(len(perm), size)
    source = [positions[old * size + d] for old in perm for d in range(size)]
    moved = [(dst, src) for dst, src in zip(positions, source) if dst != src]
    if not moved:
        return False
    weight = _dense_view(module, proj.conv1d)
    dim = ROLE_DIM[role]
    targets = torch.tensor([dst for dst, _ in moved], device=weight.device)
    sources = torch.tensor([src for _, src in moved], device=weight.device)
    # index_select copies the moving rows/columns first, so the in-place copy reads no overwritten value
    weight.index_copy_(dim, targets, weight.index_select(dim, sources))
    bias = getattr(module, "bias", None)
    if dim == 0 and bias is not None:
        bias.data.index_copy_(0, targets, bias.data.index_select(0, sources))
    return True


def _moves(structure: Structure, perms: dict[int, BlockPermutation], inverse: bool):
    by_index = {block.index: block for block in structure.blocks}
    for b, perm in perms.items():
        block = by_index[b]
        for role, proj in block.projections().items():
            order = _role_perm(perm, role)
            if order is not None:
                yield proj, role, (_inverse(order) if inverse else order), unit_size(block, role)
        if block.attention is not None and perm.heads is not None:
            for gate in block.attention.gates:  # output gates: rows per query head, like q's
                size = len(gate.index) // block.attention.num_heads
                yield gate, "q", (_inverse(perm.heads) if inverse else perm.heads), size
        for role, norm in block.attention.norms if block.attention is not None else ():
            order = perm.heads if role == "q" else perm.kv_heads  # a norm weight over the whole q or k projection
            if order is not None:
                yield norm, "q", (_inverse(order) if inverse else order), len(norm.index) // len(order)


def apply_permutations(model: nn.Module, structure: Structure, perms: dict[int, BlockPermutation],
                       inverse: bool = False) -> int:
    """Fold ``perms`` into the weights of ``model`` in place (``inverse=True`` undoes them).

    Returns how many projections moved. All or nothing: if one projection fails, those already moved
    are moved back before the error propagates.
    """
    return len(_apply(model, structure, perms, inverse))


_Move = tuple[nn.Module, Projection, str, Sequence[int], int]


def _apply(model: nn.Module, structure: Structure, perms: dict[int, BlockPermutation], inverse: bool) -> list[_Move]:
    done: list[_Move] = []
    try:
        for proj, role, order, size in _moves(structure, perms, inverse):
            module = model.get_submodule(proj.path)
            if _permute_projection(module, proj, role, order, size):
                done.append((module, proj, role, order, size))
    except BaseException:
        _restore(done)
        raise
    return done


def _restore(done: list[_Move]) -> None:
    """Move back what :func:`apply_permutations` moved, on the module objects it moved them in."""
    for module, proj, role, order, size in reversed(done):
        _permute_projection(module, proj, role, _inverse(order), size)


@fxpass(reads=("model", "structure", "plan"), writes=("model", "perms"))
def permute_coupled(model: nn.Module, structure: Structure, plan: Plan) -> PassResult:
    """Co-permute each block's heads and channels so every role's selected units are contiguous.

    Writes the permuted ``model`` (in place; exactly the same function) and ``perms`` (one
    :class:`BlockPermutation` per block with selected units); ``undo`` moves the weights back.

    >>> import fxsparse, torch
    >>> from fxsparse.models import tiny_model
    >>> from fxsparse.passes.select_units import choose_units
    >>> model = tiny_model("llama")
    >>> structure = fxsparse.inspect(model)
    >>> x = torch.arange(9).reshape(1, 9)
    >>> before = model(x).logits
    >>> result = permute_coupled(model=model, structure=structure, plan=choose_units(structure, {"down": 0.1}))
    >>> result.modified, torch.allclose(model(x).logits, before, atol=1e-5)
    (True, True)
    >>> result.undo()
    >>> torch.equal(model(x).logits, before)
    True
    """
    perms = plan_permutations(structure, plan)
    done = _apply(model, structure, perms, inverse=False)
    return PassResult(modified=bool(done), info=f"moved {len(done)} projections in {len(perms)} blocks",
                      outputs={"model": model, "perms": perms}, undo=lambda: _restore(done))


def permuted_module_indices(structure: Structure, plan: Plan, perms: dict[int, BlockPermutation]):
    """``{(block, role): (path, dim, rows)}`` of the selected units *after* the permutation.

    Also returns, per entry, the original row/column each new position came from (same order), which
    adapters use to store blocks in the model's original numbering.
    """
    by_index = {block.index: block for block in structure.blocks}
    result = {}
    for b, roles in plan.units.items():
        block: Block = by_index[b]
        for role, units in roles.items():
            proj = block.projections()[role]
            size = unit_size(block, role)
            order = _role_perm(perms.get(b, BlockPermutation()), role)
            if order is None:
                order = list(range(max(units) + 1))  # not permuted: new position == old unit
            inv = _inverse(order)
            new_units = sorted(inv[u] for u in units)
            rows = [proj.indices(u, size) for u in new_units]
            origin = [proj.indices(order[u], size) for u in new_units]
            flat = list(itertools.chain.from_iterable(rows))
            flat_origin = list(itertools.chain.from_iterable(origin))
            ordering = sorted(range(len(flat)), key=flat.__getitem__)
            result[(b, role)] = (proj.path, ROLE_DIM[role], [flat[i] for i in ordering],
                                 [flat_origin[i] for i in ordering])
    return result
