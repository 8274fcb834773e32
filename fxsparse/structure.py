"""Records of what structure discovery found: heads, GQA groups, FFN channels and coupled pairs.

A :class:`Structure` is plain data. ``Structure.to_dict()`` is the JSON contract of
``fxsparse.inspect``. Which roles are permuted together is fixed by the record types themselves: an
:class:`Attention` couples the q, k, v rows and the o columns of its heads, an :class:`FFN` the gate/up
rows and the down columns of its channels (``fxsparse.passes.permute_coupled`` reads them that way).

Index convention: a producer projection (q, k, v, gate, up) owns *output rows* of its module's weight,
a consumer projection (o, down) owns *input columns*. ``Projection.index`` lists them unit by unit
(unit = one head of ``head_dim`` rows/columns, or one FFN channel); ``None`` means "all of the
module's rows/columns in their natural order", the common unfused case.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Projection", "Attention", "FFN", "Block", "Structure"]


@dataclass(frozen=True)
class Projection:
    """One role (q, k, v, o, gate, up or down) played by (a slice of) one linear module.

    >>> Projection("layers.0.attn.q_proj").indices(1, unit_size=4)
    [4, 5, 6, 7]
    """

    path: str
    index: tuple[int, ...] | None = None
    conv1d: bool = False  # GPT-2 style Conv1D: weight stored as (in, out)

    def indices(self, unit: int, unit_size: int = 1) -> list[int]:
        """Rows (producers) or columns (consumers) of the module that belong to ``unit``."""
        lo, hi = unit * unit_size, (unit + 1) * unit_size
        if self.index is None:
            return list(range(lo, hi))
        return list(self.index[lo:hi])

    def all_indices(self, units: int, unit_size: int = 1) -> list[int]:
        if self.index is None:
            return list(range(units * unit_size))
        return list(self.index)

    @property
    def fused(self) -> bool:
        return self.index is not None


@dataclass(frozen=True)
class Attention:
    q: Projection
    k: Projection
    v: Projection
    o: Projection
    num_heads: int
    num_kv_heads: int
    head_dim: int
    # Output gates (``out * sigmoid(gate_proj(x))`` before o): rows per query head (``index``, always given, lists
    # them head by head: head_dim rows each, or one per head) that move with the query heads when they are
    # permuted; never trained by S²FT (no role), never replaced.
    gates: tuple[Projection, ...] = ()
    # Norm weights over the whole q or k projection (OLMo-2's q_norm/k_norm): ("q" | "k", the norm module with the
    # rows of its weight (and bias) per query / KV head). They move with those heads; never trained or replaced.
    norms: tuple[tuple[str, Projection], ...] = ()
    # Rows (q, k, v) / columns (o) per head where they differ from head_dim (multi-head latent attention: q and k
    # heads hold a rotary part k takes from a projection shared by every head, v and o heads another size).
    role_dims: tuple[tuple[str, int], ...] = ()
    # Why the heads of this attention must stay where they are ("" when they can be permuted): something acts per
    # head outside the projections (attention sinks, ALiBi-style slopes, a per-head gain or gate, a norm over
    # several heads) or heads could not be followed through an op. S²FT still selects and trains its heads, read
    # in place (a gathered block instead of a contiguous one), so the function never changes.
    fixed_order: str = ""

    def unit_size(self, role: str) -> int:
        """Rows (q, k, v) or columns (o) of one head of ``role``."""
        return dict(self.role_dims).get(role, self.head_dim)

    @property
    def kv_groups(self) -> int:
        """Query heads per KV head (1: MHA, num_heads: MQA)."""
        return self.num_heads // self.num_kv_heads

    def projections(self) -> dict[str, Projection]:
        return {"q": self.q, "k": self.k, "v": self.v, "o": self.o}


@dataclass(frozen=True)
class FFN:
    up: Projection
    gate: Projection | None
    down: Projection
    channels: int
    activation: str = ""
    # Why the channels must stay where they are ("" when they can be permuted): a norm over every channel between
    # the product and down (BitNet's ffn_sub_norm), a per-channel scale on the way (nGPT-style models). S²FT still
    # trains selected channels, in place.
    fixed_order: str = ""

    def projections(self) -> dict[str, Projection]:
        roles = {"up": self.up, "down": self.down}
        if self.gate is not None:
            roles["gate"] = self.gate
        return roles


@dataclass(frozen=True)
class Block:
    """A unit of coupling: one attention and/or one FFN, permuted and selected on its own.

    ``part_of``: for a further FFN of the same transformer block (a mixture-of-experts expert with its own
    ``nn.Linear`` projections, or a shared expert beside them), the index of the block it belongs to;
    ``to_dict`` lists such FFNs under that block's ``"experts"``. None for a transformer block itself.
    """

    index: int
    attention: Attention | None
    ffn: FFN | None
    part_of: int | None = None

    def projections(self) -> dict[str, Projection]:
        """Role name -> projection, for every role this block has."""
        roles: dict[str, Projection] = {}
        if self.attention is not None:
            roles.update(self.attention.projections())
        if self.ffn is not None:
            roles.update(self.ffn.projections())
        return roles


@dataclass
class Structure:
    """What :func:`fxsparse.inspect` returns.

    >>> s = Structure(blocks=[], unrecognized=["lm_head"])
    >>> s.to_dict()["unrecognized"]
    ['lm_head']
    """

    blocks: list[Block]
    unrecognized: list[str] = field(default_factory=list)
    linear_paths: list[str] = field(default_factory=list)  # every linear-like module, in graph order
    reasons: dict[str, str] = field(default_factory=dict)  # unrecognized path -> why, where discovery knows

    def to_dict(self) -> dict:
        """JSON-ready: ``"blocks"`` (one entry per transformer block; further FFNs of a block, i.e.
        experts, under its ``"experts"``, each with the ``"block"`` index plans use), ``"unrecognized"``
        and ``"reasons"``."""
        blocks, entries = [], {}
        for block in self.blocks:
            if block.part_of is not None and block.part_of in entries and block.ffn is not None:
                expert = {"block": block.index, **self._ffn_dict(block.ffn)}
                entries[block.part_of].setdefault("experts", []).append(expert)
                continue
            entry: dict = {"index": block.index, "attention": None, "ffn": None}
            entries[block.index] = entry
            if block.attention is not None:
                a = block.attention
                entry["attention"] = {
                    "q": a.q.path, "k": a.k.path, "v": a.v.path, "o": a.o.path,
                    "num_heads": a.num_heads, "num_kv_heads": a.num_kv_heads, "head_dim": a.head_dim,
                    "fused_qkv": a.q.fused or a.k.fused or a.v.fused,
                }
                if a.gates:
                    entry["attention"]["gates"] = [g.path for g in a.gates]
                if a.norms:
                    entry["attention"]["norms"] = {role: p.path for role, p in a.norms}
                if a.role_dims:
                    entry["attention"]["role_dims"] = dict(a.role_dims)
                if a.fixed_order:
                    entry["attention"]["fixed_order"] = a.fixed_order
            if block.ffn is not None:
                entry["ffn"] = self._ffn_dict(block.ffn)
            blocks.append(entry)
        return {"blocks": blocks, "unrecognized": list(self.unrecognized), "reasons": dict(self.reasons)}

    @staticmethod
    def _ffn_dict(f: FFN) -> dict:
        entry = {"up": f.up.path, "gate": f.gate.path if f.gate else None, "down": f.down.path,
                 "channels": f.channels, "activation": f.activation, "fused_gate_up": f.up.fused}
        if f.fixed_order:
            entry["fixed_order"] = f.fixed_order
        return entry

    def target_paths(self) -> list[str]:
        """Module paths of every attention/FFN projection found (deduplicated, graph order)."""
        seen: dict[str, None] = {}
        for block in self.blocks:
            for proj in block.projections().values():
                seen.setdefault(proj.path, None)
        return list(seen)
