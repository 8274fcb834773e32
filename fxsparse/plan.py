"""Plan: which heads / FFN channels S²FT trains, per block and role, as plain serialisable data.

A :class:`Plan` is produced by the selection pass (``fxsparse.passes.select_units``) and read by the
recipe that builds the S²FT layers. Units are counted in the model's own numbering: for ``q`` and
``o`` a unit is a query head, for ``k`` and ``v`` a KV head, for ``gate``, ``up`` and ``down`` an FFN
channel. :meth:`Plan.module_indices` turns them into rows/columns of module weights.

>>> plan = Plan(units={0: {"o": [3], "down": [17, 5]}}, ratios={"o": 0.1, "down": 0.02}, select="random",
...             seed=0, arch={"blocks": 2, "num_heads": 9, "num_kv_heads": 3, "head_dim": 64, "channels": 1536})
>>> plan.units[0]["down"]
[5, 17]
>>> Plan.from_json(plan.to_json()) == plan
True
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from fxsparse.structure import Block, Structure

__all__ = [
    "ROLES", "HEAD_ROLES", "KV_ROLES", "CHANNEL_ROLES", "CRITERIA", "ROLE_DIM",
    "Plan", "arch_of", "unit_count", "unit_size", "check_ratios",
]

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
HEAD_ROLES = ("q", "o")  # units: query heads
KV_ROLES = ("k", "v")  # units: KV heads
CHANNEL_ROLES = ("gate", "up", "down")  # units: FFN channels
CRITERIA = ("random", "weight", "activation", "gradient")
# Producers own output rows of their weight (dim 0), consumers input columns (dim 1).
ROLE_DIM = {"q": 0, "k": 0, "v": 0, "gate": 0, "up": 0, "o": 1, "down": 1}
_ARCH_KEYS = ("blocks", "num_heads", "num_kv_heads", "head_dim", "channels")


def check_ratios(ratios: Any) -> dict[str, float]:
    """The one check of S²FT ratios: a mapping from role to a real number in [0, 1] (Python, numpy or a 0-dim
    tensor; not a bool); returns plain floats, or raises ``ValueError`` naming the bad entry and what is allowed.

    >>> check_ratios({"o": 0.1, "down": 1})
    {'o': 0.1, 'down': 1.0}
    """
    from collections.abc import Mapping

    from fxsparse.recipes import as_real  # the recipes package imports this module

    if not isinstance(ratios, Mapping):
        raise ValueError(f"ratios={ratios!r} must be a mapping from projection to fraction, e.g. "
                         f"{{'o': 0.1, 'down': 0.02}}; projections: {list(ROLES)}")
    checked = {}
    for role, ratio in ratios.items():
        if role not in ROLES:
            raise ValueError(f"unknown projection {role!r} in ratios; known: {list(ROLES)}")
        value = as_real(ratio)
        if value is None or not 0 <= value <= 1:
            raise ValueError(f"ratio for {role!r} must be a real number in [0, 1], got {ratio!r}")
        checked[role] = value
    return checked


def unit_count(block: Block, role: str) -> int:
    """How many units ``role`` has in ``block`` (0 when the block lacks that role)."""
    if role in block.projections():
        if role in HEAD_ROLES:
            return block.attention.num_heads
        if role in KV_ROLES:
            return block.attention.num_kv_heads
        return block.ffn.channels
    return 0


def unit_size(block: Block, role: str) -> int:
    """Rows/columns per unit: ``head_dim`` for heads, 1 for FFN channels."""
    return block.attention.unit_size(role) if role in HEAD_ROLES + KV_ROLES else 1


def _bad(message: str) -> ValueError:
    return ValueError(f"malformed Plan: {message}")


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{what} must be an int, got {value!r}")
    return value


@dataclass(eq=True)
class Plan:
    """Selected units per block and role, with the options that produced them.

    ``units``: ``{block: {role: sorted unit list}}`` (roles with nothing selected are omitted);
    ``ratios``: the requested fraction per role; ``select``: the criterion; ``seed``; ``layers``: the
    blocks the pool was drawn from (None: all); ``arch``: ``blocks``, ``num_heads``, ``num_kv_heads``,
    ``head_dim``, ``channels`` of the model the plan was made for (checked when it is applied).
    """

    units: dict[int, dict[str, list[int]]]
    ratios: dict[str, float]
    select: str
    seed: int
    arch: dict[str, int]
    layers: list[int] | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # free-form, JSON-serialisable extras

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Normalise (sort units, int keys) and check every field; ``ValueError`` names what is wrong."""
        if not isinstance(self.arch, dict):
            raise _bad(f"arch must be a dict, got {type(self.arch).__name__}")
        missing = [key for key in _ARCH_KEYS if key not in self.arch]
        if missing:
            raise _bad(f"arch lacks {missing}")
        for key in _ARCH_KEYS:
            if _as_int(self.arch[key], f"arch[{key!r}]") < 0:
                raise _bad(f"arch[{key!r}] is negative ({self.arch[key]})")
        if self.select not in CRITERIA:
            raise _bad(f"unknown select criterion {self.select!r}; known: {list(CRITERIA)}")
        _as_int(self.seed, "seed")
        if not isinstance(self.ratios, dict):
            raise _bad(f"ratios must be a dict, got {type(self.ratios).__name__}")
        try:
            check_ratios(self.ratios)
        except ValueError as err:
            raise _bad(str(err)) from None
        blocks = self.arch["blocks"]
        if self.layers is not None:
            self.layers = [_as_int(i, "layers entry") for i in self.layers]
            outside = [i for i in self.layers if not 0 <= i < blocks]
            if outside:
                raise _bad(f"layers {outside} outside [0, {blocks})")
        if not isinstance(self.units, dict):
            raise _bad(f"units must be a dict, got {type(self.units).__name__}")
        limits = {**dict.fromkeys(HEAD_ROLES, self.arch["num_heads"]),
                  **dict.fromkeys(KV_ROLES, self.arch["num_kv_heads"]),
                  **dict.fromkeys(CHANNEL_ROLES, self.arch["channels"])}
        units: dict[int, dict[str, list[int]]] = {}
        for key, roles in self.units.items():
            block = _block_key(key)
            if not 0 <= block < blocks:
                raise _bad(f"block {key!r} outside [0, {blocks})")
            if block in units:
                raise _bad(f"block {block} given twice")
            if not isinstance(roles, dict):
                raise _bad(f"units[{key!r}] must be a dict of role -> list, got {type(roles).__name__}")
            units[block] = {}
            for role, selected in roles.items():
                if role not in ROLES:
                    raise _bad(f"unknown role {role!r} in block {block}; known: {list(ROLES)}")
                if not isinstance(selected, (list, tuple)):
                    raise _bad(f"units of block {block} role {role!r} must be a list, got {selected!r}")
                values = sorted(_as_int(u, f"unit of block {block} role {role!r}") for u in selected)
                limit = limits[role]
                sizes = self.arch.get("sizes")
                if isinstance(sizes, list) and block < len(sizes):  # blocks of different sizes
                    limit = sizes[block][0 if role in HEAD_ROLES else 1 if role in KV_ROLES else 3]
                bad = [u for u in values if not 0 <= u < limit]
                if bad:
                    raise _bad(f"units {bad} of block {block} role {role!r} outside [0, {limit})")
                if len(set(values)) != len(values):
                    raise _bad(f"duplicate units in block {block} role {role!r}: {values}")
                if values:
                    units[block][role] = values
        self.units = {b: units[b] for b in sorted(units) if units[b]}

    def selected(self, block: int, role: str) -> list[int]:
        """Sorted selected units of ``role`` in ``block`` (empty if none)."""
        return list(self.units.get(block, {}).get(role, []))

    def count(self, role: str) -> int:
        """Selected units of ``role`` over all blocks."""
        return sum(len(roles.get(role, [])) for roles in self.units.values())

    def check_structure(self, structure: Structure) -> None:
        """``ValueError`` if ``structure`` is not the architecture this plan was made for."""
        arch = arch_of(structure)
        diff = {k: (self.arch.get(k), arch.get(k)) for k in (*_ARCH_KEYS, "sizes") if self.arch.get(k) != arch.get(k)}
        if diff:
            raise ValueError(f"plan was made for another architecture: (plan, model) differ in {diff}")

    def module_indices(self, structure: Structure) -> dict[tuple[int, str], tuple[str, int, list[int]]]:
        """``{(block, role): (module path, dim, sorted rows/columns)}`` for every selected role.

        ``dim`` is 0 (output rows: q, k, v, gate, up) or 1 (input columns: o, down). Fused modules
        (one qkv or gate_up linear) are mapped through ``Projection.index``.
        """
        self.check_structure(structure)
        by_index = {block.index: block for block in structure.blocks}
        result = {}
        for b, roles in self.units.items():
            block = by_index[b]
            for role, selected in roles.items():
                proj = block.projections()[role]
                size = unit_size(block, role)
                rows = sorted(i for u in selected for i in proj.indices(u, size))
                result[(b, role)] = (proj.path, ROLE_DIM[role], rows)
        return result

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (block keys as strings)."""
        return {
            "units": {str(b): {r: list(u) for r, u in roles.items()} for b, roles in self.units.items()},
            "ratios": dict(self.ratios),
            "select": self.select,
            "seed": self.seed,
            "layers": None if self.layers is None else list(self.layers),
            "arch": dict(self.arch),
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """Inverse of :meth:`to_dict`; ``ValueError`` on malformed data."""
        if not isinstance(data, dict):
            raise _bad(f"expected a dict, got {type(data).__name__}")
        required = ("units", "ratios", "select", "seed", "arch")
        missing = [k for k in required if k not in data]
        if missing:
            raise _bad(f"missing field(s) {missing}")
        unknown = sorted(set(data) - set(required) - {"layers", "meta"})
        if unknown:
            raise _bad(f"unknown field(s) {unknown}")
        ratios, arch = data["ratios"], data["arch"]
        return cls(units=data["units"], ratios=dict(ratios) if isinstance(ratios, dict) else ratios,
                   select=data["select"], seed=data["seed"], arch=dict(arch) if isinstance(arch, dict) else arch,
                   layers=data.get("layers"), meta=dict(data.get("meta") or {}))

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _bad(f"not JSON ({exc})") from None
        return cls.from_dict(data)


def _block_key(key: Any) -> int:
    if isinstance(key, bool):
        raise _bad(f"block key {key!r} is not an int")
    if isinstance(key, int):
        return key
    if isinstance(key, str) and key.isdigit():
        return int(key)
    raise _bad(f"block key {key!r} is not an int")


def arch_of(structure: Structure) -> dict[str, int]:
    """The ``arch`` record of a plan: block count and the head/channel sizes of ``structure``.

    Blocks without attention or FFN do not count towards the sizes. Where blocks differ (dense first
    layers then MoE shared experts, per-layer widths), each size is the largest and ``"sizes"`` lists
    ``[num_heads, num_kv_heads, head_dim, channels]`` per block (0 where a block lacks that part).
    """
    if not structure.blocks:
        raise ValueError("structure has no blocks (no attention/FFN found)")
    arch = {"blocks": len(structure.blocks), "num_heads": 0, "num_kv_heads": 0, "head_dim": 0, "channels": 0}
    for block in structure.blocks:
        values = {}
        if block.attention is not None:
            a = block.attention
            values.update(num_heads=a.num_heads, num_kv_heads=a.num_kv_heads, head_dim=a.head_dim)
        if block.ffn is not None:
            values["channels"] = block.ffn.channels
        for key, value in values.items():
            if arch[key] not in (0, value):
                arch["sizes"] = []
            arch[key] = max(arch[key], value)
    if "sizes" in arch:
        arch["sizes"] = [[b.attention.num_heads, b.attention.num_kv_heads, b.attention.head_dim]
                         if b.attention is not None else [0, 0, 0] for b in structure.blocks]
        for entry, block in zip(arch["sizes"], structure.blocks):
            entry.append(block.ffn.channels if block.ffn is not None else 0)
    return arch
