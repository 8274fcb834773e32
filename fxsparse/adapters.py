"""S²FT adapters: the selection and the trained blocks, and nothing else (safetensors + json).

An adapter folder holds ``adapter.json`` (format version, recipe, model class, the Plan, and per module
its dim, original rows/columns and block shape) and ``adapter.safetensors`` (one tensor per module,
its rows/columns in the model's *original* numbering, so the file does not depend on the permutation).

- :func:`save_adapter` / :func:`load_adapter`: a transformed model to a folder and back onto a fresh
  base model (which is then transformed with the stored plan and ready to train further or merge);
- :class:`AdapterSwitcher`: hot-swapping adapters on a *merged* (plain) model in place: applying one
  overwrites the selected rows/columns and keeps their base values, removing restores them bit-exactly.

>>> import fxsparse, tempfile
>>> from fxsparse.models import tiny_model
>>> model = fxsparse.transform(tiny_model("llama"), "s2ft", ratios={"o": 0.25, "down": 0.1})
>>> folder = fxsparse.save_adapter(model, tempfile.mkdtemp())
>>> fresh = fxsparse.load_adapter(tiny_model("llama"), folder)
>>> sorted(fresh._fxsparse_s2ft.replaced) == sorted(model._fxsparse_s2ft.replaced)
True
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fxsparse.plan import Plan

__all__ = ["save_adapter", "load_adapter", "read_adapter", "AdapterSwitcher", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_JSON, _TENSORS = "adapter.json", "adapter.safetensors"


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Write ``model``'s S²FT plan and trained blocks to the folder ``path``; returns the folder."""
    from fxsparse.recipes.s2ft import s2ft_state

    state = s2ft_state(model)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, modules = {}, {}
    for module_path, (dim, _rows, origin) in state.replaced.items():
        layer = model.get_submodule(module_path)
        block = layer.block.detach()
        order = sorted(range(len(origin)), key=origin.__getitem__)  # original numbering, ascending
        tensors[module_path] = block.index_select(dim, torch.tensor(order, device=block.device)).contiguous().cpu()
        modules[module_path] = {"dim": dim, "index": sorted(origin), "shape": list(block.shape),
                                "dtype": str(block.dtype).removeprefix("torch.")}
    meta = {"format": FORMAT_VERSION, "recipe": "s2ft", "model_class": type(model).__name__,
            "plan": state.plan.to_dict(), "modules": modules}
    save_file(tensors, str(folder / _TENSORS))
    (folder / _JSON).write_text(json.dumps(meta, indent=1, sort_keys=True))
    return folder


def read_adapter(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of an adapter folder; ``ValueError`` if missing, corrupt or inconsistent."""
    folder = Path(path)
    try:
        meta = json.loads((folder / _JSON).read_text())
    except FileNotFoundError:
        raise ValueError(f"{folder} is not an adapter folder (no {_JSON})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"corrupt adapter metadata {folder / _JSON}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION or meta.get("recipe") != "s2ft":
        raise ValueError(f"{folder / _JSON} is not an fxsparse S2FT adapter of format {FORMAT_VERSION}")
    try:
        tensors = load_file(str(folder / _TENSORS))
    except (SafetensorError, OSError, FileNotFoundError) as exc:
        raise ValueError(f"corrupt or missing adapter tensors {folder / _TENSORS}: {exc}") from None
    modules = meta.get("modules", {})
    if set(modules) != set(tensors):
        raise ValueError(f"adapter {folder}: json names {sorted(set(modules) ^ set(tensors))} that the tensors "
                         "file does not (or the reverse)")
    for name, info in modules.items():
        if list(tensors[name].shape) != info["shape"]:
            raise ValueError(f"adapter {folder}: tensor {name} has shape {list(tensors[name].shape)}, "
                             f"json says {info['shape']}")
    return meta, tensors


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Transform a fresh base ``model`` with the adapter's plan and load its trained blocks."""
    import fxsparse

    meta, tensors = read_adapter(path)
    if meta.get("model_class") != type(model).__name__:
        raise ValueError(f"adapter was saved from a {meta.get('model_class')}, not a {type(model).__name__}")
    plan = Plan.from_dict(meta["plan"])
    fxsparse.transform(model, "s2ft", plan=plan)  # check_structure raises ValueError on another arch
    state = model._fxsparse_s2ft
    if set(state.replaced) != set(meta["modules"]):
        raise ValueError(f"adapter modules {sorted(meta['modules'])} do not match the model's "
                         f"{sorted(state.replaced)}")
    with torch.no_grad():
        for module_path, (dim, _rows, origin) in state.replaced.items():
            info, saved = meta["modules"][module_path], tensors[module_path]
            layer = model.get_submodule(module_path)
            if info["dim"] != dim or info["index"] != sorted(origin) or list(saved.shape) != list(layer.block.shape):
                raise ValueError(f"adapter block {module_path} (dim {info['dim']}, shape {list(saved.shape)}) "
                                 f"does not fit the model (dim {dim}, shape {list(layer.block.shape)})")
            position = {o: i for i, o in enumerate(sorted(origin))}
            order = torch.tensor([position[o] for o in origin])
            layer.block.copy_(saved.index_select(dim, order).to(layer.block.dtype))
    return model


class AdapterSwitcher:
    """Swap S²FT adapters on a merged (plain) model in place, without re-transforming it.

    >>> import fxsparse, tempfile, torch
    >>> from fxsparse.models import tiny_model
    >>> trained = fxsparse.transform(tiny_model("llama"), "s2ft", ratios={"o": 0.25, "down": 0.1})
    >>> folder = fxsparse.save_adapter(trained, tempfile.mkdtemp())
    >>> base = tiny_model("llama")
    >>> before = base.model.layers[0].mlp.down_proj.weight.clone()
    >>> switcher = AdapterSwitcher(base)
    >>> seconds = switcher.apply(folder)
    >>> switcher.remove()
    >>> torch.equal(base.model.layers[0].mlp.down_proj.weight, before)
    True
    """

    def __init__(self, model: nn.Module):
        if getattr(model, "_fxsparse_recipe", None) is not None:
            raise ValueError("AdapterSwitcher works on a plain (merged or base) model; merge it first")
        self.model = model
        self.active: str | None = None
        self._saved: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def apply(self, path: str | Path) -> float:
        """Remove the active adapter (if any), write the one at ``path``; returns seconds taken."""
        meta, tensors = read_adapter(path)
        start = time.perf_counter()
        self.remove()
        for module_path, info in meta["modules"].items():
            module = self.model.get_submodule(module_path)
            conv1d = type(module).__name__ == "Conv1D"
            weight = module.weight.data.t() if conv1d else module.weight.data
            dim = info["dim"]
            index = torch.tensor(info["index"], device=weight.device)
            block_shape = list(tensors[module_path].shape)
            if weight.shape[dim] <= int(index.max()) or block_shape[1 - dim] != weight.shape[1 - dim]:
                raise ValueError(f"adapter block {module_path} does not fit weight of shape {list(weight.shape)}")
            self._saved[module_path] = (dim, index, weight.index_select(dim, index).clone())
            weight.index_copy_(dim, index, tensors[module_path].to(weight.device, weight.dtype))
        self.active = str(path)
        return time.perf_counter() - start

    @torch.no_grad()
    def remove(self) -> None:
        """Restore the base values the active adapter overwrote (bit-exact)."""
        for module_path, (dim, index, base) in self._saved.items():
            module = self.model.get_submodule(module_path)
            weight = module.weight.data.t() if type(module).__name__ == "Conv1D" else module.weight.data
            weight.index_copy_(dim, index, base)
        self._saved.clear()
        self.active = None
