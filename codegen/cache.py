"""The on-disk kernel cache: one JSON file per (kernel, source hash, shapes, dtype, layout, device, versions).

Entries live under ``$FXSPARSE_CACHE_DIR/kernels`` (default ``~/.cache/fxsparse/kernels``), so a later
process never tunes the same shape twice. :func:`cache_stats` counts look-ups in this process.

Why this is not Triton's own autotune cache: Triton keys by ``ptxas version + arch`` (an H100 and an H200
share entries), its cache is off under ``TRITON_INTERPRET``, concurrent writers raced (triton#2688) and
corrupt files crashed readers. Here:

- the key is the whole specialisation (:func:`full_key`): kernel name, a hash of the kernel's source (and
  of the ``@triton.jit`` helpers it calls), the caller's shape key (token bucket, N, K, rank, nnz, dtype,
  layout...), a hash of the candidate configs, the device name and the torch and Triton versions. The file
  name is a digest of that key, so entries of other versions or GPUs live side by side in one folder;
- the stored key is compared with the wanted one on every read: a truncated file, garbage bytes, JSON of
  the wrong shape or an entry whose key differs is a miss, with one :class:`CacheWarning` per file per
  process, never an exception; the next store rewrites it;
- writes go to a temp file unique to the writer in the same folder, are fsync'ed and moved into place with
  ``os.replace`` (atomic on POSIX and Windows): a reader sees the old entry or the new one, never half of
  one. A write that fails (read-only folder, disk full) warns once and the config stays in memory only;
- :func:`tuning_lock` takes an advisory ``fcntl.flock`` per key (lock files under ``kernels/.locks``) so two
  processes tuning the same shape at once do not both tune: the second waits and then reads the first
  one's entry. Where ``fcntl`` or ``flock`` is missing (Windows, some network mounts) both tune, which is
  harmless: each writes a complete entry and the last ``os.replace`` wins (tests cover both cases).

>>> key = full_key("toy", full_key, {"M": 64, "dtype": "torch.float32"})
>>> sorted(key)
['candidates', 'device', 'format', 'kernel', 'key', 'source', 'torch', 'triton']
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import inspect
import json
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, racing writers stay harmless (see the module docstring)
    fcntl = None

__all__ = [
    "CacheWarning",
    "FORMAT",
    "cache_dir",
    "full_key",
    "digest",
    "entry_path",
    "read_entry",
    "report_bad_entry",
    "lookup",
    "store",
    "tuning_lock",
    "count_hit",
    "count_miss",
    "count_tuned",
    "cache_stats",
    "reset_cache_stats",
    "clear_cache",
]

# Bumped when the entry layout changes; it is part of the key, so old entries are simply never found.
FORMAT = 1

# How long a process waits for another one tuning the same key before it tunes on its own (tuning one
# shape on a GPU takes a few seconds of compilation per candidate; a holder that died releases at once).
LOCK_TIMEOUT_S = 600.0
_LOCK_POLL_S = 0.02
_LOCKING = True  # tests switch it off to check that racing writers without a lock are harmless too

_TEMP_PREFIX = ".tmp-"
_LOCK_FOLDER = ".locks"

_STATS: dict[str, int] = {"hits": 0, "misses": 0, "tuned": 0, "corrupt": 0, "write_errors": 0}
_WARNED: set[tuple[str, str]] = set()  # (read | write, path): one warning of each kind per file


class CacheWarning(UserWarning):
    """A kernel-cache entry could not be read or written; the look-up counts as a miss."""


def cache_dir() -> Path:
    """``$FXSPARSE_CACHE_DIR/kernels`` (default ``~/.cache/fxsparse/kernels``), read at every call."""
    root = Path(os.environ.get("FXSPARSE_CACHE_DIR") or Path.home() / ".cache" / "fxsparse")
    return root / "kernels"


def _function_source(obj: Any) -> str | None:
    fn = getattr(obj, "fn", obj)
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return getattr(obj, "src", None)


def _jit_helpers(obj: Any) -> list[Any]:
    """The ``@triton.jit`` functions ``obj`` calls by global name (their edits must invalidate entries too)."""
    fn = getattr(obj, "fn", None)
    code, scope = getattr(fn, "__code__", None), getattr(fn, "__globals__", None)
    if code is None or scope is None:
        return []
    values = [scope.get(name) for name in code.co_names]
    for cell in getattr(fn, "__closure__", None) or ():  # helpers defined in an enclosing function
        with contextlib.suppress(ValueError):
            values.append(cell.cell_contents)
    # JITFunction / InterpretedFunction both wrap the Python function as .fn and launch via [grid]
    return [v for v in values if v is not obj and callable(getattr(v, "fn", None)) and hasattr(v, "__getitem__")]


_SOURCE_HASHES: dict[int, tuple[Any, str]] = {}  # id(kernel) -> (kernel, hash); the kernel is held alive


def _source_hash(kernel: Any) -> str:
    known = _SOURCE_HASHES.get(id(kernel))
    if known is not None and known[0] is kernel:
        return known[1]
    parts, seen, todo = [], set(), [kernel]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        parts.append(_function_source(obj) or repr(obj))
        todo.extend(_jit_helpers(obj))
    value = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    _SOURCE_HASHES[id(kernel)] = (kernel, value)
    return value


def _device_name() -> str:
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on"):
        return "interpreter"
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return triton.__version__


def _candidates_hash(configs: Sequence[Any] | None) -> str:
    """Hash of the candidate list: a kernel owner editing the candidates must not get an old winner back."""
    if configs is None:
        return "-"
    dicts = [c.to_dict() if hasattr(c, "to_dict") else c for c in configs]
    return hashlib.sha256(json.dumps(dicts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def full_key(name: str, kernel: Any, key: Mapping[str, Any], configs: Sequence[Any] | None = None) -> dict[str, Any]:
    """Everything that picks one cache entry: kernel ``name`` and source hash, the caller's shape ``key``
    (values are stringified), the candidate ``configs``, device name, torch and Triton versions."""
    return {"format": FORMAT, "kernel": name, "source": _source_hash(kernel),
            "key": {str(k): str(v) for k, v in sorted(key.items())}, "candidates": _candidates_hash(configs),
            "device": _device_name(), "torch": torch.__version__, "triton": _triton_version()}


def digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def entry_path(key: Mapping[str, Any]) -> Path:
    """Where the entry of ``key`` (a :func:`full_key`) lives."""
    return cache_dir() / f"{key['kernel']}-{digest(key)}.json"


def count_hit() -> None:
    _STATS["hits"] += 1


def count_miss() -> None:
    _STATS["misses"] += 1


def count_tuned() -> None:
    _STATS["tuned"] += 1


def _warn_once(path: Path, message: str, kind: str = "read") -> None:
    if (kind, str(path)) in _WARNED:
        return
    _WARNED.add((kind, str(path)))
    warnings.warn(f"fxsparse kernel cache: {message}", CacheWarning, stacklevel=3)


def _describe_difference(stored: Any, wanted: Mapping[str, Any]) -> str:
    if not isinstance(stored, dict):
        return "it has no key"
    fields = [f"{k} {stored.get(k)!r} (want {v!r})" for k, v in wanted.items() if stored.get(k) != v]
    return ", ".join(fields) or "its key differs"


def report_bad_entry(key: Mapping[str, Any], reason: str) -> None:
    """Count and warn (once per file) about an entry the caller could not use, e.g. a config it rejects."""
    _STATS["corrupt"] += 1
    path = entry_path(key)
    _warn_once(path, f"entry {path} is unusable ({reason}); treated as a miss, will be rewritten")


def read_entry(key: Mapping[str, Any]) -> dict | None:
    """The stored entry of ``key`` or None, without counting a hit or miss. A missing file is silently
    None; an unreadable, corrupt, wrongly shaped or foreign entry is None plus one warning per file."""
    path = entry_path(key)
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        _warn_once(path, f"cannot read {path} ({exc}); treated as a miss")
        return None
    try:
        entry = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        _STATS["corrupt"] += 1
        _warn_once(path, f"corrupt entry {path} ({type(exc).__name__}: {exc}); treated as a miss, will be rewritten")
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
        _STATS["corrupt"] += 1
        _warn_once(path, f"entry {path} is not a cache entry (no 'config'); treated as a miss, will be rewritten")
        return None
    if entry.get("key") != dict(key):
        _STATS["corrupt"] += 1
        _warn_once(path, f"entry {path} belongs to another build: {_describe_difference(entry.get('key'), key)}; "
                         "treated as a miss, will be rewritten")
        return None
    return entry


def lookup(key: Mapping[str, Any]) -> dict | None:
    """:func:`read_entry`, counted in :func:`cache_stats` as a hit or a miss."""
    entry = read_entry(key)
    _STATS["hits" if entry is not None else "misses"] += 1
    return entry


def store(key: Mapping[str, Any], value: Mapping[str, Any]) -> Path | None:
    """Write the entry ``{"key": key, "created": <UTC date>, **value}`` atomically; returns its path, or
    None (with a warning) when the folder cannot be written: the process carries on without the entry."""
    path = entry_path(key)
    entry = {"key": dict(key), "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             **value}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{_TEMP_PREFIX}{os.getpid()}-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(entry, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_folder(path.parent)
    except OSError as exc:
        _STATS["write_errors"] += 1
        _warn_once(path, f"cannot write {path} ({exc}); the tuned config is kept in this process only", "write")
        return None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return path


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def tuning_lock(key: Mapping[str, Any], timeout: float | None = None) -> Iterator[bool]:
    """Hold an advisory lock on ``key`` while tuning it; yields whether the lock is held.

    A second process asking for the same key waits (up to ``timeout``, default :data:`LOCK_TIMEOUT_S`) and
    should then re-read the entry the first one wrote. Without ``fcntl``, on a folder that cannot be written
    or after the timeout it yields False and the caller tunes anyway (racing writers are harmless).
    """
    if fcntl is None or not _LOCKING:
        yield False
        return
    folder = cache_dir() / _LOCK_FOLDER
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / f"{key['kernel']}-{digest(key)}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield False
        return
    deadline = time.monotonic() + (LOCK_TIMEOUT_S if timeout is None else timeout)
    held = False
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    break
                time.sleep(_LOCK_POLL_S)
            except OSError:  # a file system without flock (some network mounts)
                break
        yield held
    finally:
        if held:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def cache_stats() -> dict[str, Any]:
    """Kernel-cache look-ups in this process: ``hits`` and ``misses`` (a miss tunes, or waits for another
    process that tunes), ``tuned`` (configs this process timed and stored), ``corrupt`` (bad entries met),
    ``write_errors`` and ``dir`` (the cache folder now)."""
    return {**_STATS, "dir": str(cache_dir())}


def reset_cache_stats() -> None:
    for name in _STATS:
        _STATS[name] = 0


def clear_cache() -> int:
    """Delete every entry of the cache folder (and stale temp and lock files); returns how many entries.

    Also forgets the configs this process picked, so the next launch looks at the (empty) disk again.
    """
    folder = cache_dir()
    removed = 0
    if folder.is_dir():
        for path in folder.glob("*.json"):
            if path.name.startswith(_TEMP_PREFIX):
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
        for path in [*folder.glob(f"{_TEMP_PREFIX}*"), *(folder / _LOCK_FOLDER).glob("*.lock")]:
            with contextlib.suppress(OSError):
                path.unlink()  # a writer still busy with its temp file just warns when its os.replace fails
    from fxsparse.codegen import autotune

    autotune.forget_picked()
    return removed
