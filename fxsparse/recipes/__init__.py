"""Recipes: a config dataclass, an ordered list of passes, and how the result lands on the model.

Every recipe is an instance of :class:`Recipe`, registered under its name *and* its config class, so
``fxsparse.transform(model, "s2ft", ratios=...)`` and ``fxsparse.transform(model, S2FTConfig(ratios=...))``
are the same call (like torchao's ``quantize_(model, config)``). Adding a recipe is writing a config
dataclass, choosing passes (new ones go in their own files under ``passes/``) and calling
:func:`register_recipe`: no pass and no manager changes.

:func:`apply_recipe` runs a recipe: a :class:`~fxsparse.passes.manager.PassManager` over a context that
starts with ``model``, ``config`` and ``example_inputs``, then the recipe's ``finish``. On any error the
model is put back exactly as it was — module tree, parameter objects and values, ``requires_grad`` —
and the error is raised again.

>>> from fxsparse.recipes.s2ft import S2FTConfig
>>> get_recipe("s2ft") is get_recipe(S2FTConfig()) is get_recipe(S2FTConfig)
True
>>> [spec_of(p).name for p in get_recipe("sltrain").passes]
['capture_graph', 'find_structure', 'replace_sltrain', 'train_all_parameters']
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from fxsparse.passes.manager import PassManager, PassResult, check_pipeline, spec_of

__all__ = ["Recipe", "INPUTS", "register_recipe", "get_recipe", "available_recipes", "make_config",
           "resolve_recipe", "apply_recipe"]

# What the pass context holds before a recipe's first pass.
INPUTS = ("model", "config", "example_inputs")

_BY_NAME: dict[str, Recipe] = {}
_BY_CONFIG: dict[type, Recipe] = {}
_BUILTIN = {
    "s2ft": "fxsparse.recipes.s2ft",
    "sltrain": "fxsparse.recipes.sltrain",
    "lowrank": "fxsparse.recipes.sltrain",
}


@dataclass(frozen=True)
class Recipe:
    """One way to transform a model.

    ``name``: the registry key; ``config_cls``: a frozen dataclass validated in ``__post_init__``;
    ``passes``: pass functions (see :mod:`fxsparse.passes.manager`), checked against ``INPUTS`` and the
    config's fields when the recipe is made; ``merge(model) -> model``: back to plain layers;
    ``finish(model, context)``: what of the pass context stays on the model (called after the last pass).
    """

    name: str
    config_cls: type
    passes: Sequence[Callable[..., PassResult]]
    merge: Callable[[nn.Module], nn.Module]
    finish: Callable[[nn.Module, Mapping[str, Any]], None] | None = None

    def __post_init__(self):
        if not dataclasses.is_dataclass(self.config_cls):
            raise TypeError(f"recipe {self.name!r}: config_cls must be a dataclass, got {self.config_cls!r}")
        object.__setattr__(self, "passes", tuple(self.passes))
        check_pipeline(self.passes, INPUTS, self.config_cls)

    def describe(self) -> str:
        """``name (Config): pass -> pass -> ...``"""
        return f"{self.name} ({self.config_cls.__name__}): " + " -> ".join(spec_of(p).name for p in self.passes)


def register_recipe(recipe: Recipe) -> Recipe:
    """Make ``recipe`` reachable by its name and by its config class; returns it."""
    if not isinstance(recipe, Recipe):
        raise TypeError(f"register_recipe takes a Recipe, got {type(recipe).__name__}")
    _BY_NAME[recipe.name] = recipe
    _BY_CONFIG[recipe.config_cls] = recipe
    return recipe


def _load_builtins() -> None:
    for module in dict.fromkeys(_BUILTIN.values()):
        importlib.import_module(module)


def get_recipe(key: Any) -> Recipe:
    """The recipe for a name, a config instance or class, or a :class:`Recipe` (returned as is)."""
    if isinstance(key, Recipe):
        return key
    if isinstance(key, str):
        if key not in _BY_NAME and key in _BUILTIN:
            importlib.import_module(_BUILTIN[key])
        if key not in _BY_NAME:
            raise ValueError(f"unknown recipe {key!r}; available: {available_recipes()}")
        return _BY_NAME[key]
    config_cls = key if isinstance(key, type) else type(key)
    if config_cls not in _BY_CONFIG:
        _load_builtins()
    if config_cls not in _BY_CONFIG:
        raise ValueError(f"no recipe takes a {config_cls.__name__}; recipes: {available_recipes()} with configs "
                         f"{sorted(c.__name__ for c in _BY_CONFIG)}")
    return _BY_CONFIG[config_cls]


def available_recipes() -> list[str]:
    return sorted(set(_BY_NAME) | set(_BUILTIN))


def make_config(config_cls: type, options: Mapping[str, Any]) -> Any:
    """Build ``config_cls(**options)``, naming unknown options in a ``ValueError``."""
    known = {f.name for f in dataclasses.fields(config_cls) if f.init}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {config_cls.__name__}; known: {sorted(known)}")
    return config_cls(**options)


def resolve_recipe(recipe: Any, options: Mapping[str, Any]) -> tuple[Recipe, Any]:
    """``(Recipe, config)`` from what ``fxsparse.transform`` got: a name, Recipe or config, plus options."""
    handler = get_recipe(recipe)
    if isinstance(recipe, handler.config_cls):
        if not options:
            return handler, recipe
        make_config(handler.config_cls, options)  # names unknown options
        return handler, dataclasses.replace(recipe, **options)
    return handler, make_config(handler.config_cls, options)


class _ModelSnapshot:
    """The module tree, parameter and buffer objects, ``requires_grad`` flags, train/eval modes and fxsparse
    attributes of a model: cheap to take (no tensor is copied) and enough to undo module swaps and
    freezing. Tensor values changed in place are restored by the passes' ``undo``."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = [(m, dict(m._modules), dict(m._parameters), dict(m._buffers), m.training)
                        for m in model.modules()]
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.attributes = {k: v for k, v in vars(model).items() if k.startswith("_fxsparse")}

    def restore(self) -> None:
        for module, children, params, buffers, training in self.modules:
            for current, saved in ((module._modules, children), (module._parameters, params),
                                   (module._buffers, buffers)):
                current.clear()
                current.update(saved)
            module.training = training
        for param, flag in self.flags:
            param.requires_grad_(flag)
        for key in [k for k in vars(self.model) if k.startswith("_fxsparse")]:
            delattr(self.model, key)
        for key, value in self.attributes.items():
            setattr(self.model, key, value)


def apply_recipe(model: nn.Module, recipe: Recipe, config: Any, example_inputs: Any = None,
                 log: Callable[[str], None] | None = None) -> nn.Module:
    """Run ``recipe`` on ``model`` in place (see the module docstring); returns ``model``."""
    if getattr(model, "_fxsparse_recipe", None) is not None:
        raise ValueError(f"model is already transformed with recipe {model._fxsparse_recipe!r}; merge it first")
    if not isinstance(config, recipe.config_cls):
        raise ValueError(f"recipe {recipe.name!r} takes a {recipe.config_cls.__name__}, got {type(config).__name__}")
    snapshot = _ModelSnapshot(model)
    manager = PassManager(recipe.passes, inputs=INPUTS, config_cls=recipe.config_cls, log=log)
    try:
        context = manager.run({"model": model, "config": config, "example_inputs": example_inputs})
        if recipe.finish is not None:
            recipe.finish(model, context)
        model._fxsparse_recipe = recipe.name
    except BaseException:
        manager.rollback()
        snapshot.restore()
        raise
    return model
