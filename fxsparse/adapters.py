"""S²FT adapters: the selection and the trained blocks, and nothing else (safetensors + json).

An adapter folder holds ``adapter.json`` (format version, recipe, model class, the Plan, and per module
its dim, original rows/columns and block shape) and ``adapter.safetensors`` (one tensor per module,
its rows/columns in the model's *original* numbering, so the file does not depend on the permutation).

- :func:`save_adapter` / :func:`load_adapter`: a transformed model to a folder and back onto a fresh
  base model (which is then transformed with the stored plan and ready to train further or merge);
- :class:`AdapterSwitcher`: hot-swapping adapters on a *merged* (plain) model in place: applying one
  overwrites the selected rows/columns and keeps their base values, removing restores them bit-exactly;
- :class:`MultiAdapterModel`: serving several adapters in one batch on one plain base model, each batch
  row with its own adapter (``adapter_ids``), through the ``fxsparse::s2ft_multi_adapter`` op.

>>> import fxsparse, tempfile
>>> from fxsparse.models import tiny_model
>>> model = fxsparse.transform(tiny_model("llama"), "s2ft", ratios={"o": 0.25, "down": 0.1})
>>> folder = fxsparse.save_adapter(model, tempfile.mkdtemp())
>>> fresh = fxsparse.load_adapter(tiny_model("llama"), folder)
>>> sorted(fresh._fxsparse_s2ft.replaced) == sorted(model._fxsparse_s2ft.replaced)
True
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fxsparse.plan import Plan

__all__ = ["save_adapter", "load_adapter", "read_adapter", "AdapterSwitcher", "MultiAdapterModel", "FORMAT_VERSION"]

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


AdapterIds = Sequence["str | int | None"] | torch.Tensor | None


class MultiAdapterModel(nn.Module):
    """Serve several S²FT adapters on one plain base model, one adapter per batch row.

    Each listed linear of ``model`` becomes a :class:`~fxsparse.layers.s2ft.MultiAdapterLinear` that adds,
    per token, its row's adapter delta (trained block minus base values, over that adapter's own
    rows/columns in the original numbering) to the base GEMM; rows with id ``None`` or -1 get the base
    model. ``model`` is changed in place (its state dict keys stay the same); :meth:`unwrap` restores it.
    Every adapter is checked like :func:`load_adapter`: model class, architecture (its plan against the
    model's structure), module names, shapes.

    ``forward``/``generate`` take ``adapter_ids``: one entry per batch row, an adapter name, its number
    (order of ``adapters``), or None/-1. Without it, the ids set by :meth:`set_adapter_ids` (or
    :meth:`use`) apply, default all base.

    >>> import fxsparse, tempfile, torch
    >>> from fxsparse.models import tiny_model
    >>> trained = fxsparse.transform(tiny_model("llama"), "s2ft", ratios={"o": 0.25, "down": 0.1})
    >>> folder = fxsparse.save_adapter(trained, tempfile.mkdtemp())
    >>> served = MultiAdapterModel(tiny_model("llama"), {"math": folder})
    >>> ids = torch.tensor([[1, 2, 3], [1, 2, 3]])
    >>> logits = served(ids, adapter_ids=["math", None]).logits
    >>> torch.allclose(logits[0], trained(ids[:1]).logits[0], atol=1e-5)
    True
    >>> base = served.unwrap()
    """

    def __init__(self, model: nn.Module, adapters: Mapping[str, str | Path]):
        from fxsparse.layers.s2ft import AdapterRouter, MultiAdapterLinear

        super().__init__()
        if getattr(model, "_fxsparse_recipe", None) is not None:
            raise ValueError("MultiAdapterModel serves adapters on a plain (base or merged) model; this one is "
                             f"transformed with {model._fxsparse_recipe!r}: merge it first")
        if not isinstance(adapters, Mapping) or not adapters:
            raise ValueError("adapters must be a non-empty mapping {name: adapter folder}")
        for name in adapters:
            if not isinstance(name, str) or not name:
                raise ValueError(f"adapter names must be non-empty strings, got {name!r}")
        loaded = {}
        for name, path in adapters.items():
            meta, tensors = read_adapter(path)
            if meta.get("model_class") != type(model).__name__:
                raise ValueError(f"adapter {name!r} ({path}) was saved from a {meta.get('model_class')}, "
                                 f"not a {type(model).__name__}")
            loaded[name] = (path, meta, tensors)
        import fxsparse

        structure = fxsparse.inspect(model)  # the architecture each adapter's plan was made for, as load_adapter
        per_module: dict[str, list] = {}
        for number, (name, (path, meta, tensors)) in enumerate(loaded.items()):
            try:
                Plan.from_dict(meta["plan"]).check_structure(structure)
            except ValueError as exc:
                raise ValueError(f"adapter {name!r} ({path}): {exc}") from None
            for module_path, info in meta["modules"].items():
                delta = _adapter_delta(model, name, module_path, info, tensors[module_path])
                per_module.setdefault(module_path, [None] * len(adapters))[number] = delta
        self.model = model
        self.names: tuple[str, ...] = tuple(adapters)
        self.router = AdapterRouter()
        for module_path, deltas in per_module.items():
            model.set_submodule(module_path, MultiAdapterLinear(model.get_submodule(module_path), deltas,
                                                                self.router))
        self._wrapped = tuple(per_module)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)  # config, device, generation_config, ...

    def adapter_number(self, adapter: str | int | None) -> int:
        """The number of ``adapter`` (a name or a number), -1 for None or -1 (the base model)."""
        if adapter is None:
            return -1
        if isinstance(adapter, str):
            if adapter not in self.names:
                raise ValueError(f"unknown adapter {adapter!r}; known: {list(self.names)}")
            return self.names.index(adapter)
        if isinstance(adapter, bool) or not isinstance(adapter, int) or not -1 <= adapter < len(self.names):
            raise ValueError(f"adapter id {adapter!r} is not a name, -1, None or an int in [0, {len(self.names)})")
        return adapter

    def _row_ids(self, adapter_ids: AdapterIds) -> torch.Tensor | None:
        if adapter_ids is None:
            return None
        if isinstance(adapter_ids, torch.Tensor):
            ids = adapter_ids.detach().reshape(-1).to("cpu", torch.int64)
            bad = ids[(ids < -1) | (ids >= len(self.names))]
            if bad.numel():
                raise ValueError(f"adapter id {int(bad[0])} is not -1 or in [0, {len(self.names)})")
            return ids
        if isinstance(adapter_ids, (str, int)):
            raise ValueError("adapter_ids takes one entry per batch row (a list), not a single adapter")
        return torch.tensor([self.adapter_number(a) for a in adapter_ids], dtype=torch.int64)

    def set_adapter_ids(self, adapter_ids: AdapterIds) -> None:
        """Route the next calls' batch rows to these adapters (None: all rows on the base model)."""
        self.router.set(self._row_ids(adapter_ids))

    @contextlib.contextmanager
    def use(self, adapter_ids: AdapterIds) -> Iterator[MultiAdapterModel]:
        """Within the block, batch rows use ``adapter_ids`` (for APIs that call the model themselves)."""
        previous = self.router.row_ids
        self.set_adapter_ids(adapter_ids)
        try:
            yield self
        finally:
            self.router.set(previous)

    def forward(self, *args, adapter_ids: AdapterIds = None, **kwargs):
        if adapter_ids is None:
            return self.model(*args, **kwargs)
        with self.use(adapter_ids):
            return self.model(*args, **kwargs)

    def generate(self, *args, adapter_ids: AdapterIds = None, **kwargs):
        """``model.generate`` with each batch row on its adapter (beams/return sequences follow their row)."""
        if adapter_ids is None:
            return self.model.generate(*args, **kwargs)
        with self.use(adapter_ids):
            return self.model.generate(*args, **kwargs)

    def unwrap(self) -> nn.Module:
        """Put the original linear modules back and return the base model (unchanged values)."""
        for module_path in self._wrapped:
            self.model.set_submodule(module_path, self.model.get_submodule(module_path).original)
        self._wrapped = ()
        return self.model


def _adapter_delta(model: nn.Module, name: str, module_path: str, info: Mapping, block: torch.Tensor
                   ) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(dim, index, trained block minus base values) of one adapter module; ValueError naming what is wrong."""
    try:
        module = model.get_submodule(module_path)
    except AttributeError:
        raise ValueError(f"adapter {name!r}: module {module_path!r} is not in the model") from None
    conv1d = type(module).__name__ == "Conv1D"
    if not conv1d and not isinstance(module, nn.Linear):
        raise ValueError(f"adapter {name!r}: module {module_path!r} is a {type(module).__name__}, "
                         "not a Linear or Conv1D")
    weight = module.weight.detach().t() if conv1d else module.weight.detach()
    dim, index = info.get("dim"), info.get("index")
    if dim not in (0, 1):
        raise ValueError(f"adapter {name!r}: module {module_path!r} has dim {dim!r}, expected 0 or 1")
    if (not isinstance(index, list) or not index or any(isinstance(i, bool) or not isinstance(i, int) for i in index)
            or index != sorted(set(index)) or index[0] < 0 or index[-1] >= weight.shape[dim]):
        raise ValueError(f"adapter {name!r}: module {module_path!r} index must be sorted distinct ints in "
                         f"[0, {weight.shape[dim]})")
    expected = [len(index), weight.shape[1]] if dim == 0 else [weight.shape[0], len(index)]
    if list(block.shape) != expected:
        raise ValueError(f"adapter {name!r}: block {module_path} has shape {list(block.shape)}, the model's "
                         f"weight {list(weight.shape)} needs {expected}")
    idx = torch.tensor(index, device=weight.device)
    wide = torch.float64 if weight.dtype == torch.float64 else torch.float32
    delta = block.to(weight.device, wide) - weight.index_select(dim, idx).to(wide)
    return dim, idx, delta.to(weight.dtype)
