"""S²FT adapters: the selection and the trained blocks, and nothing else (safetensors + json).

An adapter folder holds ``adapter.json`` (format version, recipe, model class, the Plan, per module its
dim, original rows/columns, block shape and ``base_sha256``, and ``tensors_sha256``) and
``adapter.safetensors`` (one tensor per module, its rows/columns in the model's *original* numbering, so
the file does not depend on the permutation). Both are written atomically (a temp file of the writer's
own, fsync, ``os.replace``), the tensors first: an interrupted save leaves the previous adapter or a
tensors file whose sha256 no longer matches the json, which loading reports by name.

An adapter is tied to its base: ``base_sha256`` is :func:`~fxsparse.layers.s2ft.values_fingerprint` of
the base values under the block (the selected rows/columns of the model it was trained from, in original
order, rounded to bfloat16 so a float32 base and its bfloat16 copy agree). :func:`load_adapter`,
:class:`AdapterSwitcher` and :class:`MultiAdapterModel` refuse another base with
:class:`BaseMismatchError` naming the projections, unless ``allow_other_base=True``, which writes the
adapter's trained values onto that base on purpose. (The file keeps absolute trained values, not
deltas: loading onto its own base is then bit-exact.) Adapters written before the fingerprint existed
(format 1) still load, with one warning per folder.

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
import dataclasses
import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import nn

from fxsparse.layers import is_conv1d
from fxsparse.layers.s2ft import values_fingerprint
from fxsparse.plan import Plan

__all__ = ["save_adapter", "load_adapter", "read_adapter", "AdapterSwitcher", "MultiAdapterModel", "FORMAT_VERSION",
           "BaseMismatchError", "CorruptAdapterError"]

FORMAT_VERSION = 2  # 2: base_sha256 per module and tensors_sha256; 1 (still read): neither
_READABLE = (1, 2)
_JSON, _TENSORS = "adapter.json", "adapter.safetensors"
_MODULE_KEYS = ("dim", "index", "shape")
_WARNED: set[str] = set()  # folders already warned about (no fingerprint)


class BaseMismatchError(ValueError):
    """The adapter was trained on another base model than the one it is being applied to."""


class CorruptAdapterError(ValueError):
    """An adapter file is truncated, changed after it was written, or not an adapter file."""


def _write_atomic(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` through a temp file of our own in the same folder, fsync, os.replace."""
    handle, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    with contextlib.suppress(OSError):  # the rename itself reaches the disk with the folder's entry
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
                                "dtype": str(block.dtype).removeprefix("torch."),
                                "base_sha256": getattr(layer, "base_fingerprint", None)}
    data = save_bytes(tensors)
    meta = {"format": FORMAT_VERSION, "recipe": "s2ft", "model_class": type(model).__name__,
            "plan": state.plan.to_dict(), "modules": modules, "tensors_sha256": hashlib.sha256(data).hexdigest()}
    _write_atomic(folder / _TENSORS, data)  # tensors first: the json names the file it describes
    _write_atomic(folder / _JSON, json.dumps(meta, indent=1, sort_keys=True).encode())
    return folder


def read_adapter(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of an adapter folder; ``ValueError`` if missing, corrupt or inconsistent.

    A corrupt tensors file (its sha256 differs from the json's) raises :class:`CorruptAdapterError`
    naming the file.
    """
    folder = Path(path)
    if folder.is_file():
        hint = folder.parent if folder.name in (_JSON, _TENSORS) else "the folder that holds it"
        raise ValueError(f"{folder} is a file: pass the adapter folder ({hint}), which holds {_JSON} and {_TENSORS}")
    try:
        meta = json.loads((folder / _JSON).read_text())
    except FileNotFoundError:
        raise ValueError(f"{folder} is not an adapter folder (no {_JSON})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptAdapterError(f"corrupt adapter metadata {folder / _JSON}: {exc}; save the adapter again "
                                  "(fxsparse.save_adapter) from the trained model or its checkpoint") from None
    if not isinstance(meta, dict) or meta.get("format") not in _READABLE or meta.get("recipe") != "s2ft":
        raise ValueError(f"{folder / _JSON} is not an fxsparse S2FT adapter of format {list(_READABLE)}")
    _check_meta(folder, meta)
    try:
        data = (folder / _TENSORS).read_bytes()
    except OSError as exc:
        raise CorruptAdapterError(f"corrupt or missing adapter tensors {folder / _TENSORS}: {exc}") from None
    recorded = meta.get("tensors_sha256")
    if recorded is not None and hashlib.sha256(data).hexdigest() != recorded:
        raise CorruptAdapterError(
            f"corrupt adapter tensors {folder / _TENSORS}: its sha256 differs from the one {_JSON} recorded when it "
            f"was saved ({len(data)} bytes now): the file was truncated or changed. Save the adapter again "
            "(fxsparse.save_adapter) from the trained model or its checkpoint, or restore the folder from a copy")
    try:
        tensors = load_bytes(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CorruptAdapterError(f"corrupt or missing adapter tensors {folder / _TENSORS}: {exc}") from None
    modules = meta["modules"]
    if set(modules) != set(tensors):
        raise ValueError(f"adapter {folder}: json names {sorted(set(modules) ^ set(tensors))} that the tensors "
                         "file does not (or the reverse)")
    for name, info in modules.items():
        if list(tensors[name].shape) != info["shape"]:
            raise ValueError(f"adapter {folder}: tensor {name} has shape {list(tensors[name].shape)}, "
                             f"json says {info['shape']}")
    if any(info.get("base_sha256") is None for info in modules.values()) and str(folder) not in _WARNED:
        _WARNED.add(str(folder))
        warnings.warn(f"adapter {folder} records no fingerprint of the base model it was trained on (written by an "
                      "older fxsparse, or from a model built on the meta device): it cannot be checked against this "
                      "base. Save it again to record one.", UserWarning, stacklevel=3)
    return meta, tensors


def _check_meta(folder: Path, meta: dict) -> None:
    """``ValueError`` naming the missing or mistyped key of an adapter json."""
    for key, kind in (("plan", dict), ("modules", dict)):
        if key not in meta:
            raise ValueError(f"adapter {folder / _JSON} lacks the key {key!r}; save the adapter again")
        if not isinstance(meta[key], kind):
            raise ValueError(f"adapter {folder / _JSON}: {key!r} must be a {kind.__name__}, got {meta[key]!r}")
    for name, info in meta["modules"].items():
        if not isinstance(info, dict):
            raise ValueError(f"adapter {folder / _JSON}: module {name!r} must be a dict, got {info!r}")
        for key in _MODULE_KEYS:
            if key not in info:
                raise ValueError(f"adapter {folder / _JSON}: module {name!r} lacks the key {key!r}")
        if info["dim"] not in (0, 1) or isinstance(info["dim"], bool):
            raise ValueError(f"adapter {folder / _JSON}: module {name!r} has dim {info['dim']!r}, expected 0 or 1")
        index, shape = info["index"], info["shape"]
        if (not isinstance(index, list) or not index
                or any(isinstance(i, bool) or not isinstance(i, int) for i in index)):
            raise ValueError(f"adapter {folder / _JSON}: module {name!r} 'index' must be a non-empty list of ints")
        if not isinstance(shape, list) or len(shape) != 2:
            raise ValueError(f"adapter {folder / _JSON}: module {name!r} 'shape' must be a list of two ints")


def _base_values(module: nn.Module, dim: int, index: list[int]) -> torch.Tensor | None:
    """The values of a plain Linear/Conv1D under an adapter's rows/columns (None when they do not fit)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    weight = weight.detach().t() if is_conv1d(module) else weight.detach()
    if not index or min(index) < 0 or max(index) >= weight.shape[dim]:
        return None
    return weight.index_select(dim, torch.tensor(index, device=weight.device))


def _other_base(folder: Path | str, modules: Mapping[str, dict], found: Mapping[str, str | None]) -> list[str]:
    """Module paths whose recorded base fingerprint differs from ``found`` (unrecorded ones are skipped)."""
    return [path for path, info in modules.items()
            if info.get("base_sha256") is not None and found.get(path) is not None
            and found[path] != info["base_sha256"]]


def _mismatch(folder, paths: list[str]) -> BaseMismatchError:
    shown = ", ".join(paths[:6]) + (f", ... ({len(paths)} in all)" if len(paths) > 6 else "")
    return BaseMismatchError(
        f"adapter {folder} was trained on another base model: the base values under its block differ in {shown}. "
        "Apply it to the model it was trained from, or pass allow_other_base=True to write its trained values "
        "onto this base on purpose")


def load_adapter(model: nn.Module, path: str | Path, allow_other_base: bool = False) -> nn.Module:
    """Transform a fresh base ``model`` with the adapter's plan and load its trained blocks.

    All or nothing: on any error (another architecture, another base — :class:`BaseMismatchError`
    unless ``allow_other_base=True`` —, a block that does not fit) the model is left exactly as it was.
    """
    from fxsparse.recipes import apply_recipe
    from fxsparse.recipes.s2ft import S2FT, S2FTConfig, _finish

    if not isinstance(allow_other_base, bool):
        raise ValueError(f"allow_other_base must be True or False, got {allow_other_base!r}")
    meta, tensors = read_adapter(path)
    if meta.get("model_class") != type(model).__name__:
        raise ValueError(f"adapter was saved from a {meta.get('model_class')}, not a {type(model).__name__}")
    plan = Plan.from_dict(meta["plan"])

    def finish(model: nn.Module, context: Mapping) -> None:
        _finish(model, context)
        state = model._fxsparse_s2ft
        if set(state.replaced) != set(meta["modules"]):
            raise ValueError(f"adapter modules {sorted(meta['modules'])} do not match the model's "
                             f"{sorted(state.replaced)}")
        layers = {p: model.get_submodule(p) for p in state.replaced}
        other = _other_base(path, meta["modules"], {p: layer.base_fingerprint for p, layer in layers.items()})
        if other and not allow_other_base:
            raise _mismatch(path, other)
        with torch.no_grad():
            for module_path, (dim, _rows, origin) in state.replaced.items():
                info, saved, layer = meta["modules"][module_path], tensors[module_path], layers[module_path]
                if (info["dim"] != dim or info["index"] != sorted(origin)
                        or list(saved.shape) != list(layer.block.shape)):
                    raise ValueError(f"adapter block {module_path} (dim {info['dim']}, shape {list(saved.shape)}) "
                                     f"does not fit the model (dim {dim}, shape {list(layer.block.shape)})")
                position = {o: i for i, o in enumerate(sorted(origin))}
                order = torch.tensor([position[o] for o in origin])
                layer.block.copy_(saved.index_select(dim, order).to(layer.block.dtype))

    # the S2FT recipe with this finish: a failure anywhere rolls the whole transform back
    recipe = dataclasses.replace(S2FT, finish=finish)
    return apply_recipe(model, recipe, S2FTConfig(plan=plan))  # check_structure: ValueError on another arch


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
        self._structure = None  # found on the first apply: the architecture every adapter's plan must match

    def _check_adapter(self, path, meta: dict, allow_other_base: bool) -> list[tuple]:
        """Everything an adapter must satisfy, checked on the base values before anything is written:
        (module path, dim, index tensor) per module."""
        if meta.get("model_class") != type(self.model).__name__:
            raise ValueError(f"adapter {path} was saved from a {meta.get('model_class')}, not a "
                             f"{type(self.model).__name__}")
        try:
            Plan.from_dict(meta["plan"]).check_structure(self._structure)
        except ValueError as exc:
            raise ValueError(f"adapter {path}: {exc}") from None
        found, writes = {}, []
        for module_path, info in meta["modules"].items():
            try:
                module = self.model.get_submodule(module_path)
            except AttributeError:
                raise ValueError(f"adapter {path}: module {module_path!r} is not in the model") from None
            dim, index = info["dim"], info["index"]
            base = _base_values(module, dim, index)
            if base is None or list(base.shape) != list(info["shape"]):
                shape = list(getattr(module, "weight", torch.empty(0)).shape)
                raise ValueError(f"adapter block {module_path} does not fit weight of shape {shape}")
            found[module_path] = values_fingerprint(base)
            writes.append((module_path, dim, torch.tensor(index, device=base.device)))
        other = _other_base(path, meta["modules"], found)
        if other and not allow_other_base:
            raise _mismatch(path, other)
        return writes

    def _weight(self, module_path: str) -> torch.Tensor:
        module = self.model.get_submodule(module_path)
        return module.weight.data.t() if is_conv1d(module) else module.weight.data

    @torch.no_grad()
    def apply(self, path: str | Path, allow_other_base: bool = False) -> float:
        """Remove the active adapter (if any), write the one at ``path``; returns seconds taken.

        Checked like :func:`load_adapter` (model class, architecture, modules and shapes, the base
        fingerprint unless ``allow_other_base=True``) before anything is written. All or nothing: on any
        error the model, and which adapter is active, are exactly as before.
        """
        import fxsparse

        if not isinstance(allow_other_base, bool):
            raise ValueError(f"allow_other_base must be True or False, got {allow_other_base!r}")
        meta, tensors = read_adapter(path)
        if self._structure is None:  # once, not timed: structure discovery captures the model
            self._structure = fxsparse.inspect(self.model)
        start = time.perf_counter()
        previous = (self.active, dict(self._saved),
                    {p: self._weight(p).index_select(dim, index).clone() for p, (dim, index, _) in self._saved.items()})
        try:
            self.remove()
            for module_path, dim, index in self._check_adapter(path, meta, allow_other_base):
                weight = self._weight(module_path)
                self._saved[module_path] = (dim, index, weight.index_select(dim, index).clone())
                weight.index_copy_(dim, index, tensors[module_path].to(weight.device, weight.dtype))
        except BaseException:
            self.remove()  # the new adapter's partial writes (or what a failed removal left)
            active, saved, values = previous
            for module_path, (dim, index, _base) in saved.items():
                self._weight(module_path).index_copy_(dim, index, values[module_path])
            self._saved, self.active = saved, active
            raise
        self.active = str(path)
        return time.perf_counter() - start

    @torch.no_grad()
    def remove(self) -> None:
        """Restore the base values the active adapter overwrote (bit-exact)."""
        for module_path, (dim, index, base) in self._saved.items():
            self._weight(module_path).index_copy_(dim, index, base)
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

    def __init__(self, model: nn.Module, adapters: Mapping[str, str | Path], allow_other_base: bool = False):
        from fxsparse.layers.s2ft import AdapterRouter, MultiAdapterLinear

        super().__init__()
        if getattr(model, "_fxsparse_recipe", None) is not None:
            raise ValueError("MultiAdapterModel serves adapters on a plain (base or merged) model; this one is "
                             f"transformed with {model._fxsparse_recipe!r}: merge it first")
        if not isinstance(adapters, Mapping) or not adapters:
            raise ValueError("adapters must be a non-empty mapping {name: adapter folder}")
        if not isinstance(allow_other_base, bool):
            raise ValueError(f"allow_other_base must be True or False, got {allow_other_base!r}")
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
            found = {}
            for module_path, info in meta["modules"].items():
                delta = _adapter_delta(model, name, module_path, info, tensors[module_path])
                per_module.setdefault(module_path, [None] * len(adapters))[number] = delta
                found[module_path] = values_fingerprint(_base_values(model.get_submodule(module_path),
                                                                     info["dim"], info["index"]))
            other = _other_base(path, meta["modules"], found)
            if other and not allow_other_base:
                raise _mismatch(f"{name!r} ({path})", other)
        self.model = model
        self.names: tuple[str, ...] = tuple(adapters)
        self.router = AdapterRouter()
        wrapped = {path: MultiAdapterLinear(model.get_submodule(path), deltas, self.router)
                   for path, deltas in per_module.items()}  # built before any swap: all or nothing
        for module_path, layer in wrapped.items():
            model.set_submodule(module_path, layer)
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
    conv1d = is_conv1d(module)
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
