"""Recipe registry: a recipe is a config dataclass, an ordered list of passes and a merge rule.

A recipe registers itself with :func:`register_recipe`; ``fxsparse.transform(model, recipe=name)``
looks it up here. Adding a recipe touches neither the pass manager nor ``transform``.

A recipe object has:

- ``name``: the registry key;
- ``config_cls``: a frozen dataclass validated in ``__post_init__`` (bad values -> ``ValueError``);
- ``apply(model, structure, config, example_inputs) -> model``: runs its passes, changes ``model`` in place;
- ``merge(model) -> model``: back to plain ``nn.Linear`` layers.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

__all__ = ["register_recipe", "get_recipe", "available_recipes", "make_config"]

_RECIPES: dict[str, Any] = {}
_BUILTIN = {
    "s2ft": "fxsparse.recipes.s2ft",
    "sltrain": "fxsparse.recipes.sltrain",
    "lowrank": "fxsparse.recipes.sltrain",
}


def register_recipe(recipe: Any) -> Any:
    """Class or instance decorator/registrar: ``register_recipe(MyRecipe())``."""
    _RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name_or_recipe: Any) -> Any:
    if not isinstance(name_or_recipe, str):
        return name_or_recipe
    if name_or_recipe not in _RECIPES and name_or_recipe in _BUILTIN:
        importlib.import_module(_BUILTIN[name_or_recipe])
    if name_or_recipe not in _RECIPES:
        raise ValueError(f"unknown recipe {name_or_recipe!r}; available: {available_recipes()}")
    return _RECIPES[name_or_recipe]


def available_recipes() -> list[str]:
    return sorted(set(_RECIPES) | set(_BUILTIN))


def make_config(config_cls: type, options: dict) -> Any:
    """Build ``config_cls(**options)``, naming unknown options in a ``ValueError``."""
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {config_cls.__name__}; known: {sorted(known)}")
    return config_cls(**options)
