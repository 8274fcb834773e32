"""fxsparse: a graph compiler for parameter- and memory-efficient training of transformer LMs.

>>> import fxsparse
>>> from fxsparse.models import tiny_model
>>> model = fxsparse.transform(tiny_model("llama"), recipe="s2ft", ratios={"o": 0.5, "down": 0.25})
>>> sum(p.numel() for p in fxsparse.trainable_parameters(model)) > 0
True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from fxsparse.structure import Structure

__all__ = [
    "transform",
    "inspect",
    "merge",
    "save_adapter",
    "load_adapter",
    "materialize",
    "export_lora",
    "trainable_parameters",
    "print_trainable_parameters",
    "compile_report",
    "Structure",
]

__version__ = "0.1.0"


def inspect(model: nn.Module, example_inputs: Any = None) -> Structure:
    """Find attention heads, GQA groups and FFN channels of ``model`` from its captured graph.

    >>> from fxsparse.models import tiny_model
    >>> s = inspect(tiny_model("llama"))
    >>> s.to_dict()["blocks"][0]["attention"]["num_kv_heads"]
    2
    """
    from fxsparse.passes.capture_graph import capture_graph
    from fxsparse.passes.find_structure import find_structure
    from fxsparse.passes.manager import PassManager

    manager = PassManager([capture_graph, find_structure], inputs=("model", "example_inputs"))
    return manager.run({"model": model, "example_inputs": example_inputs})["structure"]


def transform(model: nn.Module, recipe: Any = "s2ft", example_inputs: Any = None, **options) -> nn.Module:
    """Rewrite ``model`` in place for training with ``recipe``.

    ``recipe``: a name (``"s2ft"``, ``"sltrain"``, ``"lowrank"``), a config instance (``S2FTConfig(...)``,
    ``SLTrainConfig(...)``, ``LowRankConfig(...)``) or a :class:`fxsparse.recipes.Recipe`. Options are the
    config's fields (with a config instance they override its values); unknown options and bad values
    raise ``ValueError``. ``example_inputs``: what the model's forward takes (made up when None; cut to
    batch 1 and a few tokens). On any error the model is left exactly as it was.

    >>> from fxsparse.models import tiny_model
    >>> from fxsparse.recipes.sltrain import SLTrainConfig
    >>> model = transform(tiny_model("llama"), SLTrainConfig(rank=4))
    >>> type(model.model.layers[0].mlp.up_proj).__name__
    'SLTrainLinear'
    """
    from fxsparse.recipes import apply_recipe, resolve_recipe

    handler, config = resolve_recipe(recipe, options)
    return apply_recipe(model, handler, config, example_inputs)


def merge(model: nn.Module) -> nn.Module:
    """Undo :func:`transform`: plain ``nn.Linear`` layers again, trained values folded in."""
    from fxsparse.recipes import get_recipe

    name = getattr(model, "_fxsparse_recipe", None)
    if name is None:
        raise ValueError("model was not transformed by fxsparse (nothing to merge)")
    model = get_recipe(name).merge(model)
    del model._fxsparse_recipe
    handle = vars(model).pop("_fxsparse_state_check", None)
    if handle is not None:
        handle.remove()
    return model


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Write the selection and the trained blocks of an S²FT model (safetensors + json)."""
    from fxsparse.adapters import save_adapter as _save

    return _save(model, path)


def load_adapter(model: nn.Module, path: str | Path, allow_other_base: bool = False) -> nn.Module:
    """Apply a saved S²FT adapter onto a fresh base model of the same architecture (the base it was trained
    on, unless ``allow_other_base=True``; see :mod:`fxsparse.adapters`)."""
    from fxsparse.adapters import load_adapter as _load

    return _load(model, path, allow_other_base=allow_other_base)


def materialize(model: nn.Module) -> nn.Module:
    """Rebuild the index buffers and SLTrain supports of a model transformed on the meta device after
    ``model.to_empty(device=...)`` (see :func:`fxsparse.layers.materialize`); returns ``model``."""
    from fxsparse.layers import materialize as _materialize

    return _materialize(model)


def export_lora(model: nn.Module, path: str | Path, **options) -> Path:
    """Write a trained S²FT model's update as a PEFT LoRA adapter folder (see :mod:`fxsparse.export`)."""
    from fxsparse.export import export_lora as _export

    return _export(model, path, **options)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require grad, in ``model.parameters()`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def print_trainable_parameters(model: nn.Module) -> str:
    """Print and return ``trainable params: N || all params: M || trainable%: P``."""
    from fxsparse.layers.s2ft import S2FTLinear

    trainable = sum(p.numel() for p in trainable_parameters(model))
    total = sum(p.numel() for p in model.parameters())
    # an S2FT block stands in for zeroed entries of its frozen weight: count those entries once
    total -= sum(m.block.numel() for m in model.modules() if isinstance(m, S2FTLinear))
    share = 100 * trainable / max(total, 1)
    line = f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {share:.4f}"
    print(line)
    return line


def compile_report(model: nn.Module | None = None):
    """Which ``torch.compile(backend="fxsparse")`` passes fired where for ``model`` (all models: None).

    See :mod:`fxsparse.compile`; ``print(report)`` lists every candidate, ``report.summary()`` counts them.
    """
    from fxsparse.compile import compile_report as _compile_report

    return _compile_report(model)
