"""The on-disk kernel cache: one JSON file per (kernel, source hash, shapes, dtype, layout, device, versions).

Entries live under ``$FXSPARSE_CACHE_DIR/kernels`` (default ``~/.cache/fxsparse/kernels``), so a later
process never tunes the same shape twice. :func:`cache_stats` counts look-ups in this process.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["cache_dir", "full_key", "digest", "lookup", "store", "cache_stats", "reset_cache_stats", "clear_cache"]

_STATS = {"hits": 0, "misses": 0}


def cache_dir() -> Path:
    root = Path(os.environ.get("FXSPARSE_CACHE_DIR") or Path.home() / ".cache" / "fxsparse")
    return root / "kernels"


def _source_hash(kernel: Any) -> str:
    fn = getattr(kernel, "fn", kernel)
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        source = getattr(kernel, "src", repr(kernel))
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "cpu"


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return triton.__version__


def full_key(name: str, kernel: Any, key: Mapping[str, Any]) -> dict[str, Any]:
    return {"kernel": name, "source": _source_hash(kernel), "key": {k: str(v) for k, v in sorted(key.items())},
            "device": _device_name(), "torch": torch.__version__, "triton": _triton_version()}


def digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def count_hit() -> None:
    _STATS["hits"] += 1


def lookup(key: Mapping[str, Any]) -> dict | None:
    path = cache_dir() / f"{key['kernel']}-{digest(key)}.json"
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        entry = None
    if not isinstance(entry, dict) or entry.get("key") != key:
        _STATS["misses"] += 1
        return None
    _STATS["hits"] += 1
    return entry


def store(key: Mapping[str, Any], value: Mapping[str, Any]) -> Path:
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key['kernel']}-{digest(key)}.json"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as handle:
        json.dump({"key": dict(key), **value}, handle)
    os.replace(tmp, path)
    return path


def cache_stats() -> dict[str, int]:
    return dict(_STATS)


def reset_cache_stats() -> None:
    _STATS.update(hits=0, misses=0)


def clear_cache() -> int:
    removed = 0
    for path in cache_dir().glob("*.json"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed
