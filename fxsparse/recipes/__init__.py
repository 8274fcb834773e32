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

After a successful run the model refuses ``save_pretrained`` (and so ``push_to_hub`` and a
``transformers.Trainer`` checkpoint) with a ``ValueError`` saying to :func:`fxsparse.merge` it first or to
save the adapter: a transformed model's state dict holds permuted weights with the trained entries zeroed
and extra keys, which transformers would reload "successfully" into a different function. ``merge``
lifts the refusal.

>>> from fxsparse.recipes.s2ft import S2FTConfig
>>> get_recipe("s2ft") is get_recipe(S2FTConfig()) is get_recipe(S2FTConfig)
True
>>> [spec_of(p).name for p in get_recipe("sltrain").passes]
['capture_graph', 'find_structure', 'replace_sltrain', 'train_all_parameters']
"""

from __future__ import annotations

import dataclasses
import importlib
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxsparse.layers import check_layer_states
from fxsparse.passes.manager import PassManager, PassResult, check_pipeline, spec_of

__all__ = ["Recipe", "INPUTS", "register_recipe", "get_recipe", "available_recipes", "make_config",
           "resolve_recipe", "apply_recipe", "as_real", "check_seed", "SaveRefused", "lift_save_refusal"]

# What the pass context holds before a recipe's first pass.
INPUTS = ("model", "config", "example_inputs")

_BY_NAME: dict[str, Recipe] = {}
_BY_CONFIG: dict[type, Recipe] = {}
_BUILTIN = {
    "s2ft": "fxsparse.recipes.s2ft",
    "sltrain": "fxsparse.recipes.sltrain",
    "lowrank": "fxsparse.recipes.sltrain",
}
# Options renamed since they were first published: the error names the new one.
_RENAMED = {"fuse_ffn": "recompute_act"}
# torch.Generator.manual_seed takes [-2**63, 2**64); numpy generators take only non-negative seeds.
SEED_LIMIT = 2**63


def as_real(value: Any) -> float | None:
    """``float(value)`` for a real number (Python, numpy or a 0-dim torch tensor; not a bool), else None."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.dtype.is_complex:
            return None
        return float(value.item())
    if type(value).__name__ in ("bool", "bool_") or not isinstance(value, numbers.Real):
        return None
    return float(value)


def check_seed(seed: Any) -> int:
    """``seed`` as an int in ``[0, 2**63)`` (Python or numpy integer), else a ``ValueError`` naming it."""
    if type(seed).__name__ in ("bool", "bool_") or not isinstance(seed, numbers.Integral) or not (
            0 <= int(seed) < SEED_LIMIT):
        raise ValueError(f"seed={seed!r} must be an int in [0, 2**63)")
    return int(seed)


@dataclass(frozen=True)
class Recipe:
    """One way to transform a model.

    ``name``: the registry key; ``config_cls``: a frozen dataclass validated in ``__post_init__``;
    ``passes``: pass functions (see :mod:`fxsparse.passes.manager`), checked against ``INPUTS`` and the
    config's fields when the recipe is made; ``merge(model) -> model``: back to plain layers;
    ``finish(model, context)``: what of the pass context stays on the model (called after the last pass);
    ``check(model, config)``: ``ValueError`` for options that do not fit this model (called before any pass).
    """

    name: str
    config_cls: type
    passes: Sequence[Callable[..., PassResult]]
    merge: Callable[[nn.Module], nn.Module]
    finish: Callable[[nn.Module, Mapping[str, Any]], None] | None = None
    check: Callable[[nn.Module, Any], None] | None = None

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
        raise ValueError(f"recipe={key!r}: no recipe takes a {config_cls.__name__}; pass a name "
                         f"{available_recipes()}, a config instance or class {sorted(c.__name__ for c in _BY_CONFIG)} "
                         "or a Recipe")
    return _BY_CONFIG[config_cls]


def available_recipes() -> list[str]:
    return sorted(set(_BY_NAME) | set(_BUILTIN))


def make_config(config_cls: type, options: Mapping[str, Any]) -> Any:
    """Build ``config_cls(**options)``, naming unknown options in a ``ValueError``."""
    known = {f.name for f in dataclasses.fields(config_cls) if f.init}
    unknown = sorted(set(options) - known)
    if unknown:
        renamed = "".join(f"; {old!r} is now called {_RENAMED[old]!r}" for old in unknown
                          if _RENAMED.get(old) in known)
        raise ValueError(f"unknown option(s) {unknown} for {config_cls.__name__}; known: {sorted(known)}{renamed}")
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


class SaveRefused:
    """Stands in for ``model.save_pretrained`` on a transformed model (an instance attribute, so the class
    and other models are untouched): raises a ``ValueError`` saying what to do instead. Once the model is
    merged (no ``_fxsparse_recipe``) it lifts itself and saves."""

    def __init__(self, model: nn.Module, recipe: str, previous: Any = None):
        self.model, self.recipe, self.previous = model, recipe, previous

    def __call__(self, *args, **kwargs):
        if getattr(self.model, "_fxsparse_recipe", None) is None:
            lift_save_refusal(self.model)
            return self.model.save_pretrained(*args, **kwargs)
        adapter = (", or fxsparse.save_adapter(model, path) to save only the selection and trained blocks"
                   if self.recipe == "s2ft" else "")
        raise ValueError(
            f"save_pretrained refused: this model is transformed by fxsparse (recipe {self.recipe!r}), so its state "
            "dict holds fxsparse layers (permuted weights, trained entries outside .weight, extra keys) that "
            "transformers would reload as a different model. Call fxsparse.merge(model) first (to keep training "
            f"this one, save a merged copy: fxsparse.merge(copy.deepcopy(model)).save_pretrained(path)){adapter}.")


def _refuse_save(model: nn.Module, recipe: str) -> None:
    if callable(getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = SaveRefused(model, recipe, vars(model).get("save_pretrained"))


def lift_save_refusal(model: nn.Module) -> nn.Module:
    """Undo the ``save_pretrained`` refusal :func:`apply_recipe` put on ``model`` (merges call this)."""
    guard = vars(model).get("save_pretrained")
    if isinstance(guard, SaveRefused):
        del model.save_pretrained
        if guard.previous is not None:
            model.save_pretrained = guard.previous
    return model


def apply_recipe(model: nn.Module, recipe: Recipe, config: Any, example_inputs: Any = None,
                 log: Callable[[str], None] | None = None) -> nn.Module:
    """Run ``recipe`` on ``model`` in place (see the module docstring); returns ``model``."""
    if getattr(model, "_fxsparse_recipe", None) is not None:
        raise ValueError(f"model is already transformed with recipe {model._fxsparse_recipe!r}; merge it first")
    if not isinstance(config, recipe.config_cls):
        raise ValueError(f"recipe {recipe.name!r} takes a {recipe.config_cls.__name__}, got {type(config).__name__}")
    for path, module in model.named_modules():
        if type(module).__module__.startswith("fxsparse.layers."):
            raise ValueError(f"{path or 'the model'} is already an fxsparse {type(module).__name__} (a layer of an "
                             "earlier transform or adapter server): merge or unwrap that model first, or start from "
                             "the base model")
    if recipe.check is not None:
        recipe.check(model, config)
    snapshot = _ModelSnapshot(model)
    manager = PassManager(recipe.passes, inputs=INPUTS, config_cls=recipe.config_cls, log=log)
    try:
        context = manager.run({"model": model, "config": config, "example_inputs": example_inputs})
        if recipe.finish is not None:
            recipe.finish(model, context)
        model._fxsparse_recipe = recipe.name
        _refuse_save(model, recipe.name)
        model._fxsparse_state_check = model.register_load_state_dict_pre_hook(check_layer_states)
    except BaseException:
        manager.rollback()
        snapshot.restore()
        raise
    return model
