"""The ``sltrain`` and ``lowrank`` recipes: sparse-plus-low-rank (or low-rank-only) pre-training.

``fxsparse.transform(model, recipe="sltrain", rank=..., sparsity=..., alpha=..., support=..., ...)``
(or ``transform(model, SLTrainConfig(...))``) replaces every attention and FFN projection by an
:class:`~fxsparse.layers.sltrain.SLTrainLinear` (``W = B @ A * alpha / rank + S``), leaves embeddings,
norms and the LM head dense, and makes every parameter trainable. ``fxsparse.merge`` densifies the layers
back to plain ``nn.Linear`` / ``Conv1D``. Passes: ``capture_graph``, ``find_structure``,
``replace_sltrain``, ``train_all_parameters``.

Defaults, following the SLTrain paper's LLaMA settings (see ``fxsparse.passes.replace_sltrain``):

- ``rank = d // 4`` (the paper's 130M model, d=768, uses 256; the rule gives 192);
- ``alpha = 32`` for ``d < 1024``, else ``16``;
- ``sparsity = 0.03``, ``support = "random"``, ``block_size = 32``: on the development CPU (2-core EPYC,
  one thread, 350M FFN shape 1024 x 2736, 1024 tokens) the three tile products of one layer take about
  50 ms with 32 x 32 tiles against about 170 ms with 16 x 16 (4x more, smaller batched GEMMs); see
  ``benchmarks/bench_sltrain_block.py``. Layers narrower than ``block_size`` are refused (ValueError),
  pass a smaller ``block_size`` for tiny models.

``lowrank`` runs the same passes with ``LowRankConfig``, whose fixed fields say "no sparse part, ``B``
drawn like ``A``": the low-rank-only pre-training baseline.

>>> cfg = SLTrainConfig(rank=64, support="block")
>>> cfg.sparsity, cfg.block_size
(0.03, 32)
>>> LowRankConfig(rank=8).sparsity, LowRankConfig(rank=8).b_init
(0.0, 'kaiming')
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from fxsparse.layers.sltrain import SUPPORTS, SLTrainLinear
from fxsparse.passes.capture_graph import capture_graph
from fxsparse.passes.find_structure import find_structure
from fxsparse.passes.replace_sltrain import ROLES, default_alpha, default_rank, model_width, replace_sltrain
from fxsparse.passes.train_all_parameters import train_all_parameters
from fxsparse.recipes import Recipe, as_real, check_seed, lift_save_refusal, register_recipe

__all__ = [
    "SLTrainConfig",
    "LowRankConfig",
    "SLTRAIN",
    "LOWRANK",
    "default_rank",
    "default_alpha",
    "model_width",
    "merge_sltrain",
]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_common(rank, alpha, targets, seed) -> tuple[str, ...] | None:
    if rank is not None and (not _is_int(rank) or rank <= 0):
        raise ValueError(f"rank={rank!r} must be a positive int (or None for the width // 4 rule)")
    if alpha is not None:
        value = as_real(alpha)
        if value is None or not 0 < value < math.inf:
            raise ValueError(f"alpha={alpha!r} must be a positive finite number (or None for the width rule)")
    check_seed(seed)
    if targets is None:
        return None
    if isinstance(targets, str):
        targets = [targets]
    targets = tuple(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"targets={targets!r} must be None or a non-empty list of role names {list(ROLES)} "
                         "or module paths")
    return targets


def _normalise(config) -> None:
    """Check the fields both configs share; store numpy/torch scalars as Python numbers."""
    object.__setattr__(config, "targets", _check_common(config.rank, config.alpha, config.targets, config.seed))
    object.__setattr__(config, "seed", check_seed(config.seed))
    if config.alpha is not None:
        object.__setattr__(config, "alpha", as_real(config.alpha))


@dataclass(frozen=True)
class SLTrainConfig:
    """Options of the ``sltrain`` recipe (see the module docstring for the defaults' rule)."""

    rank: int | None = None
    sparsity: float = 0.03
    alpha: float | None = None
    support: str = "random"
    block_size: int = 32
    targets: tuple[str, ...] | None = None
    seed: int = 0

    def __post_init__(self):
        _normalise(self)
        sparsity = as_real(self.sparsity)
        if sparsity is None or not 0.0 < sparsity < 1.0:
            raise ValueError(f"sparsity={self.sparsity!r} must be a real number in (0, 1) (use recipe='lowrank' "
                             "for none)")
        object.__setattr__(self, "sparsity", sparsity)
        if self.support not in SUPPORTS:
            raise ValueError(f"unknown support {self.support!r}; expected one of {list(SUPPORTS)}")
        if not _is_int(self.block_size) or self.block_size <= 0:
            raise ValueError(f"block_size={self.block_size!r} must be a positive int")


@dataclass(frozen=True)
class LowRankConfig:
    """Options of the ``lowrank`` recipe: SLTrain's layers without the sparse part.

    ``B`` is drawn Kaiming-uniform like ``A`` (``b_init``): with ``B = 0`` and no sparse part every
    attention and FFN output is exactly zero, and so is every gradient reaching the blocks (o and down
    see zero inputs, v/up get nothing through a zero o/down), so a from-scratch model would never train.
    """

    rank: int | None = None
    alpha: float | None = None
    targets: tuple[str, ...] | None = None
    seed: int = 0
    sparsity: float = field(default=0.0, init=False)
    b_init: str = field(default="kaiming", init=False)

    def __post_init__(self):
        _normalise(self)


def merge_sltrain(model: nn.Module) -> nn.Module:
    """Replace every :class:`SLTrainLinear` in ``model`` by the dense layer it computes (in place)."""
    swaps = [(path, m) for path, m in model.named_modules() if isinstance(m, SLTrainLinear)]
    for path, layer in swaps:
        model.set_submodule(path, layer.to_linear())
    lift_save_refusal(model)
    return model


def _refuse_dead_layers(model: nn.Module, context: Mapping[str, Any]) -> None:
    """A sparse layer whose support rounded to no non-zero would silently be a low-rank one: refuse it
    (``apply_recipe`` then puts the model back)."""
    config = context["config"]
    dead = [path for path, m in model.named_modules() if isinstance(m, SLTrainLinear) and m.values.numel() == 0]
    if dead:
        path = min(dead, key=lambda p: model.get_submodule(p).out_features * model.get_submodule(p).in_features)
        layer = model.get_submodule(path)
        need = 1 / (layer.out_features * layer.in_features)
        raise ValueError(f"sparsity={config.sparsity!r} rounds to no non-zero in {len(dead)} layer(s), the smallest "
                         f"{path!r} ({layer.out_features} x {layer.in_features}): use sparsity >= {need:.3g}, or "
                         "recipe='lowrank' for no sparse part")


_PASSES = (capture_graph, find_structure, replace_sltrain, train_all_parameters)
SLTRAIN = register_recipe(Recipe(name="sltrain", config_cls=SLTrainConfig, passes=_PASSES, merge=merge_sltrain,
                                 finish=_refuse_dead_layers))
LOWRANK = register_recipe(Recipe(name="lowrank", config_cls=LowRankConfig, passes=_PASSES, merge=merge_sltrain))
