"""Replacement pass of the SLTrain recipes: targeted linears become :class:`SLTrainLinear` layers.

The pass works on the module tree, guided by the :class:`~fxsparse.structure.Structure` that structure
discovery found: targets are module paths (every attention/FFN projection by default, fused QKV and
gate-up projections included, never embeddings or the LM head), or role names expanded block by block.
Each replaced layer draws its support and initial values from its own seed, derived from the recipe
seed and its module path, so transforming a fresh copy of the model the same way gives the same
supports and a trained ``state_dict`` loads into it.

>>> from fxsparse.models import tiny_model
>>> from fxsparse.structure import Block, FFN, Projection, Structure
>>> model = tiny_model("llama")
>>> ffn = FFN(Projection("model.layers.0.mlp.up_proj"), None, Projection("model.layers.0.mlp.down_proj"), 80)
>>> state = SLTrainPassState(model, Structure([Block(0, None, ffn)]), rank=8, sparsity=0.03, alpha=16.0)
>>> replace_sltrain(state).modified, type(model.model.layers[0].mlp.up_proj).__name__
(True, 'SLTrainLinear')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from fxsparse.layers.sltrain import SLTrainLinear, layer_seed
from fxsparse.passes.manager import PassResult
from fxsparse.structure import Structure

__all__ = ["ROLES", "SLTrainPassState", "resolve_targets", "replace_sltrain", "mark_all_trainable"]

ROLES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class SLTrainPassState:
    """What the SLTrain passes read and write; ``rank`` and ``alpha`` are already resolved numbers."""

    model: nn.Module
    structure: Structure
    rank: int
    sparsity: float
    alpha: float
    support: str = "random"
    block_size: int = 32
    targets: Sequence[str] | None = None
    seed: int = 0
    replaced: dict[str, SLTrainLinear] = field(default_factory=dict)


def _embedding_paths(model: nn.Module) -> set[str]:
    """Module paths of the input and output embeddings (never targets: SLTrain trains them densely)."""
    found = set()
    getters = [getattr(model, name, None) for name in ("get_input_embeddings", "get_output_embeddings")]
    embeddings = [getter() for getter in getters if callable(getter)]
    embeddings += [m for m in model.modules() if isinstance(m, nn.Embedding)]
    for path, module in model.named_modules():
        if any(module is e for e in embeddings if e is not None):
            found.add(path)
    return found


def resolve_targets(model: nn.Module, structure: Structure, targets: Sequence[str] | None) -> list[str]:
    """Module paths to replace: ``None`` -> every projection in ``structure``; else role names or paths."""
    if targets is None:
        paths = structure.target_paths()
        if not paths:
            raise ValueError("structure discovery found no attention or FFN projection to replace (targets=None)")
        return paths
    modules = dict(model.named_modules())
    excluded = _embedding_paths(model)
    chosen: dict[str, None] = {}
    roles = {t for t in targets if t in ROLES}
    for target in targets:
        if target in ROLES:
            hits = [b.projections()[target] for b in structure.blocks if target in b.projections()]
            if not hits:
                raise ValueError(f"target role {target!r} is not present in any block of this model")
            for proj in hits:
                # a fused module (qkv, gate_up) can only be replaced whole: every role it carries must be asked for
                sharing = {r for b in structure.blocks for r, p in b.projections().items() if p.path == proj.path}
                if not sharing <= roles:
                    raise ValueError(
                        f"target role {target!r} is part of fused module {proj.path!r}, which also carries "
                        f"{sorted(sharing - roles)}; target those roles too or give the module path"
                    )
                chosen.setdefault(proj.path, None)
        else:
            if target not in modules:
                raise ValueError(
                    f"target {target!r} is neither a role {list(ROLES)} nor a module path of the model"
                )
            if target in excluded:
                raise ValueError(f"target {target!r} is an embedding / LM head, which SLTrain keeps dense")
            chosen.setdefault(target, None)
    return list(chosen)


def replace_sltrain(state: SLTrainPassState) -> PassResult:
    """Swap every targeted linear of ``state.model`` for a freshly initialised :class:`SLTrainLinear`."""
    model = state.model
    for path in resolve_targets(model, state.structure, state.targets):
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        linear = getattr(parent, name)
        if isinstance(linear, SLTrainLinear):
            raise ValueError(f"module {path!r} is already an SLTrainLinear")
        try:
            layer = SLTrainLinear.from_linear(
                linear, state.rank, state.sparsity, state.alpha, support=state.support,
                block_size=state.block_size, seed=layer_seed(state.seed, path),
            )
        except ValueError as exc:
            raise ValueError(f"cannot replace {path!r}: {exc}") from None
        setattr(parent, name, layer)
        state.replaced[path] = layer
    info = f"{len(state.replaced)} linears -> SLTrainLinear(rank={state.rank}, sparsity={state.sparsity})"
    return PassResult(modified=bool(state.replaced), info=info)


def mark_all_trainable(state: SLTrainPassState) -> PassResult:
    """SLTrain pre-trains every parameter: the factors and values, and densely the embeddings, norms, head."""
    changed = False
    for param in state.model.parameters():
        changed |= not param.requires_grad
        param.requires_grad_(True)
    return PassResult(modified=changed)
