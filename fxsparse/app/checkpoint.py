"""Training checkpoints: atomic writes with a sha256, verified loads, and what a checkpoint belongs to.

Every checkpoint ``X.pt`` gets a small sidecar ``X.pt.sha256`` (JSON: the file's sha256 and size). A load
hashes the file first: a truncated, empty or bit-flipped checkpoint is refused with an error that names
the file and the fix, never loaded silently and never a raw unpickling traceback. The checkpoint itself
stays a plain ``torch.save`` file (``torch.load(path, weights_only=True)`` reads it).

A kill at any moment of :func:`save_checkpoint` leaves a pair that verifies: the sidecar is published
first naming both the new and the previous checksum, then the checkpoint, then the sidecar again with the
new checksum only.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "last.pt"
>>> save_checkpoint(path, {"step": 3})
>>> load_checkpoint(path)["step"]
3
>>> _ = path.write_bytes(path.read_bytes()[:-1])
>>> load_checkpoint(path)
Traceback (most recent call last):
...
ValueError: checkpoint ... is corrupt ...
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["save_checkpoint", "load_checkpoint", "sha256_file", "sidecar_path", "model_identity", "FIX"]

# what to tell a user whose checkpoint cannot be used
FIX = "start again from step 0 with --overwrite, or resume from an older copy of the checkpoint"


def sidecar_path(path: str | Path) -> Path:
    """Where the checksum of checkpoint ``path`` is written: ``path`` + ``.sha256``."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of the file at ``path``, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    partial = path.with_name(path.name + ".part")
    partial.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(partial, path)


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(sidecar_path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("sha256"), str) else None


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """``torch.save(state)`` to ``path`` atomically, with its sha256 in ``path.sha256``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    torch.save(dict(state), partial)
    entry = {"file": path.name, "sha256": sha256_file(partial), "size": partial.stat().st_size}
    previous = _read_sidecar(path) if path.exists() else None
    sidecar = sidecar_path(path)
    if previous is not None:
        # killed between the two renames below, the old checkpoint must still verify
        kept = {key: previous[key] for key in ("sha256", "size") if key in previous}
        _write_json_atomic(sidecar, {**entry, "previous": kept})
    else:
        _write_json_atomic(sidecar, entry)
    os.replace(partial, path)
    if previous is not None:
        _write_json_atomic(sidecar, entry)


def _corrupt(path: Path, reason: str) -> ValueError:
    return ValueError(f"checkpoint {str(path)!r} is corrupt ({reason}); it cannot be loaded: {FIX}")


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """The state saved by :func:`save_checkpoint` at ``path``, after checking its sha256.

    Raises ``ValueError`` naming the file when it is missing, has no checksum, does not match it, or
    cannot be unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no checkpoint to resume from at {str(path)!r}")
    sidecar = _read_sidecar(path)
    if sidecar is None:
        raise ValueError(
            f"checkpoint {str(path)!r} has no readable checksum file {sidecar_path(path).name!r} (written by an "
            f"older fxsparse, or copied without it), so its integrity cannot be checked: {FIX}"
        )
    size, digest = path.stat().st_size, sha256_file(path)
    accepted = [sidecar, sidecar.get("previous") or {}]
    if not any(entry.get("sha256") == digest for entry in accepted):
        expected = sidecar.get("size")
        reason = "empty file" if size == 0 else (
            f"{size} bytes where {expected} were written: truncated or extended" if expected not in (None, size)
            else "sha256 differs from the one written with it: the content was changed")
        raise _corrupt(path, reason)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise _corrupt(path, f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}") from None
    if not isinstance(state, dict):
        raise _corrupt(path, f"holds a {type(state).__name__}, not a checkpoint dict")
    return state


def _sha256_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _config_dict(model: nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    # private fields (attention implementation) and the library version do not change the model
    return {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}


def model_identity(model: nn.Module, name: str | None = None) -> dict[str, Any]:
    """What a checkpoint of ``model`` must be resumed into: class, config hash, parameter shapes, recipe, plan.

    ``name`` is how the user named the model (``--model``, a preset). The S²FT plan (which heads and
    channels train) is stored in full, so a resume with another selection is refused by name.

    >>> from fxsparse.models import tiny_model
    >>> identity = model_identity(tiny_model("llama"), "tiny-llama")
    >>> identity["class"], identity["recipe"]
    ('transformers.models.llama.modeling_llama.LlamaForCausalLM', None)
    """
    cls = type(model)
    shapes = [(n, list(p.shape), str(p.dtype).removeprefix("torch.")) for n, p in model.named_parameters()]
    config = _config_dict(model)
    recipe = getattr(model, "_fxsparse_recipe", None)
    plan = None
    if recipe == "s2ft":
        from fxsparse.recipes.s2ft import s2ft_state

        plan = s2ft_state(model).plan.to_dict()
    return {
        "name": name,
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "config_sha256": None if config is None else _sha256_json(config),
        "parameters_sha256": _sha256_json(shapes),
        "parameters": sum(p.numel() for p in model.parameters()),
        "recipe": recipe,
        "plan": plan,
    }
