"""Replacement pass of the SLTrain recipes: targeted linears become :class:`SLTrainLinear` layers.

The pass works on the module tree, guided by the :class:`~fxsparse.structure.Structure` that structure
discovery found: targets are module paths (every attention/FFN projection by default, fused QKV and
gate-up projections included, never embeddings or the LM head), or role names expanded block by block.
Each replaced layer draws its support and initial values from its own seed, derived from the recipe
seed and its module path, so transforming a fresh copy of the model the same way gives the same
supports and a trained ``state_dict`` loads into it.

``rank`` and ``alpha`` default to rules of the model width ``d`` (the input width of the first
attention projection), following the SLTrain paper's LLaMA settings (60M: d=512, r=128, alpha=32; 350M:
d=1024, r=256, alpha=16; 1B: d=2048, r=512): ``rank = d // 4`` and ``alpha = 32`` below d=1024, else 16.
``sparsity=0`` leaves out the sparse part (the low-rank-only baseline), and ``b_init="kaiming"`` draws
``B`` like ``A`` instead of zero: with no sparse part a zero ``B`` would make every block output and
gradient zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fxsparse.layers import is_conv1d
from fxsparse.layers.sltrain import SLTrainLinear, layer_seed
from fxsparse.passes.manager import PassResult, fxpass
from fxsparse.plan import ROLES
from fxsparse.structure import Structure

__all__ = ["ROLES", "B_INITS", "replace_sltrain", "resolve_targets", "default_rank", "default_alpha", "model_width"]

B_INITS = ("zero", "kaiming")


def default_rank(width: int) -> int:
    """The rank rule: a quarter of the model width (512 -> 128, 1024 -> 256, 2048 -> 512)."""
    return max(1, width // 4)


def default_alpha(width: int) -> float:
    """The alpha rule: 32 below width 1024 (paper's 60M/130M), 16 from 1024 (350M, 1B)."""
    return 32.0 if width < 1024 else 16.0


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def model_width(model: nn.Module, structure: Structure) -> int:
    """The model width the rank/alpha rules use: input width of the first attention (or FFN) projection."""
    for block in structure.blocks:
        proj = block.attention.q if block.attention is not None else (block.ffn.up if block.ffn else None)
        if proj is None:
            continue
        module = model.get_submodule(proj.path)
        weight = getattr(module, "weight", None)
        if weight is not None:
            return int(weight.shape[0] if proj.conv1d or is_conv1d(module) else weight.shape[1])
    config = getattr(model, "config", None)
    for name in ("hidden_size", "n_embd", "d_model"):
        if config is not None and _is_int(getattr(config, name, None)):
            return int(getattr(config, name))
    raise ValueError("cannot tell the model width (no attention/FFN projection found); pass rank and alpha")


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


@fxpass(reads=("model", "structure"), writes=("model", "replaced"),
        options=("rank", "sparsity", "alpha", "support", "block_size", "targets", "seed", "b_init"))
def replace_sltrain(
    model: nn.Module,
    structure: Structure,
    rank: int | None = None,
    sparsity: float = 0.03,
    alpha: float | None = None,
    support: str = "random",
    block_size: int = 32,
    targets: Sequence[str] | None = None,
    seed: int = 0,
    b_init: str = "zero",
) -> PassResult:
    """Swap every targeted linear of ``model`` for a freshly initialised :class:`SLTrainLinear`.

    Writes ``replaced`` (path -> new layer). ``rank``/``alpha`` of None follow the width rules above.

    >>> import fxsparse
    >>> from fxsparse.models import tiny_model
    >>> model = tiny_model("llama")
    >>> result = replace_sltrain(model=model, structure=fxsparse.inspect(model), rank=8, targets=["up"])
    >>> sorted(result.outputs["replaced"]), result.info
    (['model.layers.0.mlp.up_proj', 'model.layers.1.mlp.up_proj'], '2 linears -> SLTrainLinear(rank=8, sparsity=0.03)')
    """
    if b_init not in B_INITS:
        raise ValueError(f"b_init={b_init!r} must be one of {list(B_INITS)}")
    if rank is None or alpha is None:
        width = model_width(model, structure)
        rank = default_rank(width) if rank is None else rank
        alpha = default_alpha(width) if alpha is None else alpha
    replaced: dict[str, SLTrainLinear] = {}
    for path in resolve_targets(model, structure, targets):
        linear = model.get_submodule(path)
        if isinstance(linear, SLTrainLinear):
            raise ValueError(f"module {path!r} is already an SLTrainLinear")
        try:
            layer = SLTrainLinear.from_linear(linear, rank, sparsity, float(alpha), support=support,
                                              block_size=block_size, seed=layer_seed(seed, path))
        except ValueError as exc:
            raise ValueError(f"cannot replace {path!r}: {exc}") from None
        model.set_submodule(path, layer)
        replaced[path] = layer
    if b_init == "kaiming":
        _draw_b(model, replaced, seed)
    info = f"{len(replaced)} linears -> SLTrainLinear(rank={rank}, sparsity={sparsity})"
    return PassResult(modified=bool(replaced), info=info, outputs={"model": model, "replaced": replaced})


@torch.no_grad()
def _draw_b(model: nn.Module, replaced: dict[str, SLTrainLinear], seed: int) -> None:
    """Kaiming-uniform ``B`` like ``A``: the product's entries then have std ``scale / (3 sqrt(in))``,
    about 0.03 at in=128 and scale 1, close to LLaMA's dense init (0.02)."""
    generator = torch.Generator().manual_seed(seed + 1)
    layers = {id(layer) for layer in replaced.values()}
    for module in model.modules():  # module order, one generator: the draw is fixed by the seed
        if id(module) in layers:
            fresh = torch.empty(module.B.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
            module.B.copy_(fresh)
