"""The ``sltrain`` and ``lowrank`` recipes: sparse-plus-low-rank (or low-rank-only) pre-training.

``fxsparse.transform(model, recipe="sltrain", rank=..., sparsity=..., alpha=..., support=..., ...)``
replaces every attention and FFN projection by an :class:`~fxsparse.layers.sltrain.SLTrainLinear`
(``W = B @ A * alpha / rank + S``), leaves embeddings, norms and the LM head dense, and makes every
parameter trainable. ``fxsparse.merge`` densifies the layers back to plain ``nn.Linear`` / ``Conv1D``.

Defaults, following the SLTrain paper's LLaMA settings (60M: d=512, r=128, alpha=32; 350M: d=1024,
r=256, alpha=16; 1B: d=2048, r=512), as a rule of the model width ``d`` (the input width of the first
attention projection):

- ``rank = d // 4`` (the paper's 130M model, d=768, uses 256; the rule gives 192);
- ``alpha = 32`` for ``d < 1024``, else ``16``;
- ``sparsity = 0.03``, ``support = "random"``, ``block_size = 32``: on the development CPU (2-core EPYC,
  one thread, 350M FFN shape 1024 x 2736, 1024 tokens) the three tile products of one layer take about
  50 ms with 32 x 32 tiles against about 170 ms with 16 x 16 (4x more, smaller batched GEMMs); see
  ``benchmarks/bench_sltrain_block.py``. Layers narrower than ``block_size`` are refused (ValueError),
  pass a smaller ``block_size`` for tiny models.

``lowrank`` is the same replacement with no sparse part (the low-rank-only pre-training baseline).

>>> cfg = SLTrainConfig(rank=64, support="block")
>>> cfg.sparsity, cfg.block_size
(0.03, 32)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxsparse.layers.sltrain import SUPPORTS, SLTrainLinear
from fxsparse.passes.manager import PassManager
from fxsparse.passes.replace_sltrain import ROLES, SLTrainPassState, mark_all_trainable, replace_sltrain
from fxsparse.recipes import register_recipe
from fxsparse.structure import Structure

__all__ = [
    "SLTrainConfig",
    "LowRankConfig",
    "SLTrainRecipe",
    "LowRankRecipe",
    "default_rank",
    "default_alpha",
    "model_width",
    "merge_sltrain",
]


def default_rank(width: int) -> int:
    """The documented rank rule: a quarter of the model width (512 -> 128, 1024 -> 256, 2048 -> 512)."""
    return max(1, width // 4)


def default_alpha(width: int) -> float:
    """The documented alpha rule: 32 below width 1024 (paper's 60M/130M), 16 from 1024 (350M, 1B)."""
    return 32.0 if width < 1024 else 16.0


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_common(rank, alpha, targets, seed) -> tuple[str, ...] | None:
    if rank is not None and (not _is_int(rank) or rank <= 0):
        raise ValueError(f"rank={rank!r} must be a positive int (or None for the width // 4 rule)")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0):
        raise ValueError(f"alpha={alpha!r} must be a positive number (or None for the width rule)")
    if not _is_int(seed):
        raise ValueError(f"seed={seed!r} must be an int")
    if targets is None:
        return None
    if isinstance(targets, str):
        targets = [targets]
    targets = tuple(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"targets={targets!r} must be None or a non-empty list of role names {list(ROLES)} "
                         "or module paths")
    return targets


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
        object.__setattr__(self, "targets", _check_common(self.rank, self.alpha, self.targets, self.seed))
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or not (
            0.0 < self.sparsity < 1.0
        ):
            raise ValueError(f"sparsity={self.sparsity!r} must be in (0, 1) (use recipe='lowrank' for none)")
        if self.support not in SUPPORTS:
            raise ValueError(f"unknown support {self.support!r}; expected one of {list(SUPPORTS)}")
        if not _is_int(self.block_size) or self.block_size <= 0:
            raise ValueError(f"block_size={self.block_size!r} must be a positive int")


@dataclass(frozen=True)
class LowRankConfig:
    """Options of the ``lowrank`` recipe: SLTrain's layers without the sparse part."""

    rank: int | None = None
    alpha: float | None = None
    targets: tuple[str, ...] | None = None
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "targets", _check_common(self.rank, self.alpha, self.targets, self.seed))


def model_width(model: nn.Module, structure: Structure) -> int:
    """The model width the rank/alpha rules use: input width of the first attention (or FFN) projection."""
    for block in structure.blocks:
        proj = block.attention.q if block.attention is not None else (block.ffn.up if block.ffn else None)
        if proj is None:
            continue
        module = model.get_submodule(proj.path)
        weight = getattr(module, "weight", None)
        if weight is not None:
            return int(weight.shape[0] if proj.conv1d or type(module).__name__ == "Conv1D" else weight.shape[1])
    config = getattr(model, "config", None)
    for name in ("hidden_size", "n_embd", "d_model"):
        if config is not None and _is_int(getattr(config, name, None)):
            return int(getattr(config, name))
    raise ValueError("cannot tell the model width (no attention/FFN projection found); pass rank and alpha")


def merge_sltrain(model: nn.Module) -> nn.Module:
    """Replace every :class:`SLTrainLinear` in ``model`` by the dense layer it computes (in place)."""
    swaps = [(path, m) for path, m in model.named_modules() if isinstance(m, SLTrainLinear)]
    for path, layer in swaps:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, name, layer.to_linear())
    return model


class SLTrainRecipe:
    """``recipe="sltrain"``: sparse-plus-low-rank layers on every targeted projection."""

    name = "sltrain"
    config_cls = SLTrainConfig

    def _state(self, model: nn.Module, structure: Structure, config: Any) -> SLTrainPassState:
        width = model_width(model, structure) if config.rank is None or config.alpha is None else 0
        return SLTrainPassState(
            model=model, structure=structure,
            rank=config.rank if config.rank is not None else default_rank(width),
            sparsity=getattr(config, "sparsity", 0.0),
            alpha=float(config.alpha) if config.alpha is not None else default_alpha(width),
            support=getattr(config, "support", "random"),
            block_size=getattr(config, "block_size", 32),
            targets=config.targets, seed=config.seed,
        )

    def apply(self, model: nn.Module, structure: Structure, config: Any, example_inputs: Any = None) -> nn.Module:
        """Run the replacement pass on ``model`` (in place) and make every parameter trainable."""
        state = self._state(model, structure, config)
        PassManager([replace_sltrain, mark_all_trainable]).run(state)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        """Densify every SLTrain layer back to ``nn.Linear`` / ``Conv1D`` (same function)."""
        return merge_sltrain(model)


class LowRankRecipe(SLTrainRecipe):
    """``recipe="lowrank"``: the low-rank-only baseline (rank-r factors, no sparse part).

    Unlike SLTrain, ``B`` starts random too (Kaiming-uniform, like ``A``). With ``B = 0`` and no sparse
    part every attention and FFN output is exactly zero, and so is every gradient reaching the blocks
    (o and down see zero inputs, v/up get nothing through a zero o/down): a from-scratch model would
    never train its blocks. With both factors Kaiming-uniform the product's entries have std
    ``scale / (3 sqrt(in))``, about 0.03 at in=128 and scale 1, close to LLaMA's dense init (0.02).
    """

    name = "lowrank"
    config_cls = LowRankConfig

    def apply(self, model: nn.Module, structure: Structure, config: Any, example_inputs: Any = None) -> nn.Module:
        super().apply(model, structure, config, example_inputs)
        generator = torch.Generator().manual_seed(config.seed + 1)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, SLTrainLinear):
                    fresh = torch.empty(module.B.shape, dtype=torch.float32)
                    nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
                    module.B.copy_(fresh)
        return model


register_recipe(SLTrainRecipe())
register_recipe(LowRankRecipe())
