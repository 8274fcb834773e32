"""Kernel selection and autotuning: which implementation runs an op, and which Triton config it uses.

``FXSPARSE_KERNELS`` (read at every call, so a test can switch it between two calls) picks the op
implementation: ``auto`` (default: Triton on CUDA tensors, torch on CPU), ``triton`` (Triton everywhere;
with ``TRITON_INTERPRET=1`` the kernels run on CPU tensors) or ``torch`` (plain torch everywhere).

:func:`pick_config` chooses a kernel's launch configuration for one specialisation key (shapes, dtype,
layout): from this process's memory, else from the on-disk cache (:mod:`fxsparse.codegen.cache`), else by
timing every candidate once (CUDA events, median) and storing the winner. Under the interpreter there
is no driver to time with: the first candidate is taken, but the cache is written and read the same way.
:func:`tuned_records` lists what this process picked (kernel, shape key, config, time, tuned or from disk).

>>> import os
>>> os.environ["FXSPARSE_KERNELS"] = "torch"
>>> kernels_mode()
'torch'
>>> del os.environ["FXSPARSE_KERNELS"]
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "Config",
    "MODES",
    "TuneRecord",
    "kernels_mode",
    "interpreting",
    "triton_available",
    "use_triton",
    "pick_config",
    "tuned_records",
    "record_picks",
    "forget_picked",
]

MODES = ("auto", "triton", "torch")


@dataclass(frozen=True)
class Config:
    """One launch configuration: the kernel's ``tl.constexpr`` meta-parameters plus warps and stages."""

    kwargs: Mapping[str, int] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2

    def to_dict(self) -> dict[str, Any]:
        return {"kwargs": dict(self.kwargs), "num_warps": self.num_warps, "num_stages": self.num_stages}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        """Inverse of :meth:`to_dict`; anything but int/bool/float meta-parameters is a ValueError."""
        kwargs = dict(data["kwargs"])
        for name, value in kwargs.items():
            if not isinstance(name, str) or not isinstance(value, (int, float, bool)):
                raise ValueError(f"bad meta-parameter {name!r}={value!r}")
        warps, stages = data["num_warps"], data["num_stages"]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (warps, stages)):
            raise ValueError(f"bad num_warps/num_stages {warps!r}/{stages!r}")
        return cls(kwargs, warps, stages)

    def describe(self) -> str:
        """Short text for tables: ``BLOCK_M=64 BLOCK_N=32 w4 s2``."""
        meta = " ".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{meta} w{self.num_warps} s{self.num_stages}".strip()

    def launch_kwargs(self) -> dict[str, int]:
        """Keyword arguments for ``kernel[grid](..., **config.launch_kwargs())``."""
        if interpreting():
            return dict(self.kwargs)  # the interpreter rejects warps/stages
        return {**self.kwargs, "num_warps": self.num_warps, "num_stages": self.num_stages}


def kernels_mode() -> str:
    """``FXSPARSE_KERNELS`` now: ``auto`` (default), ``triton`` or ``torch``; anything else is a ValueError."""
    mode = os.environ.get("FXSPARSE_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"FXSPARSE_KERNELS={mode!r} is not one of {list(MODES)}")
    return mode


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op called on ``tensors`` runs its Triton kernel (see the module docstring).

    ``triton`` mode on CPU tensors without ``TRITON_INTERPRET=1`` is an error, not a silent fallback.
    """
    mode = kernels_mode()
    if mode == "torch":
        return False
    on_cuda = any(t.is_cuda for t in tensors)
    if mode == "auto":
        return on_cuda and triton_available()
    if not triton_available():
        raise ValueError("FXSPARSE_KERNELS=triton but triton is not installed (pip install triton)")
    if not on_cuda and not interpreting():
        raise ValueError("FXSPARSE_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 (set before import)")
    return True


@dataclass(frozen=True)
class TuneRecord:
    """What :func:`pick_config` picked for one kernel specialisation in this process.

    ``source`` is ``"tuned"`` (this process chose it: timed on CUDA, or the first candidate under the
    interpreter) or ``"disk"`` (read from the cache); ``best_ms`` is the winner's median time (None where
    nothing was timed); ``timings`` pairs every candidate with its time (None: not timed or failed).
    """

    kernel: str
    key: Mapping[str, str]
    config: Config
    best_ms: float | None
    source: str
    timings: tuple[tuple[Config, float | None], ...] = ()

    @property
    def from_disk(self) -> bool:
        return self.source == "disk"


_PICKED: dict[str, TuneRecord] = {}  # digest of the full key -> the record, for this process
# The launch path: (name, id(kernel), key items, where it runs) -> (kernel, digest, record). Hashing the full
# key costs about 0.5 ms (kernel source, JSON, SHA-256); this dict lookup costs a few microseconds. The kernel
# is held so its id is never reused by another object.
_FAST: dict[tuple, tuple[Any, str, TuneRecord]] = {}
_HISTORY: list[TuneRecord] = []
_RECORDERS: list[dict[str, TuneRecord]] = []
_GUARD = threading.RLock()


def tuned_records() -> list[TuneRecord]:
    """Every specialisation resolved in this process (first look-up of each; memory hits add nothing)."""
    with _GUARD:
        return list(_HISTORY)


@contextlib.contextmanager
def record_picks() -> Iterator[list[TuneRecord]]:
    """Collect the distinct specialisations :func:`pick_config` is asked for inside the block, memory hits
    included (``fxsparse tune`` uses it to list every kernel of a model's forward and backward).

    >>> with record_picks() as picked:
    ...     pass
    >>> picked
    []
    """
    seen: dict[str, TuneRecord] = {}
    picked: list[TuneRecord] = []
    with _GUARD:
        _RECORDERS.append(seen)
    try:
        yield picked
    finally:
        with _GUARD:
            _RECORDERS.remove(seen)
        picked.extend(seen.values())


def forget_picked() -> None:
    """Forget this process's picks and records, so the next launch reads the disk cache again."""
    with _GUARD:
        _PICKED.clear()
        _FAST.clear()
        _HISTORY.clear()


def _remember(digest: str, record: TuneRecord, new: bool) -> None:
    with _GUARD:
        if new:
            _PICKED[digest] = record
            _HISTORY.append(record)
        for seen in _RECORDERS:
            seen.setdefault(digest, record)


def pick_config(
    name: str,
    kernel: Any,
    key: Mapping[str, Any],
    configs: Sequence[Config],
    run: Callable[[Config], None],
) -> Config:
    """The launch config for ``kernel`` at specialisation ``key`` (memory → disk cache → tune).

    ``name`` names the kernel (``"sltrain_block_fwd"``); ``kernel`` is the ``@triton.jit`` function (its
    source and that of the jit helpers it calls are hashed into the cache key, so editing a kernel
    invalidates its entries); ``key`` holds what selects the specialisation (token bucket, N, K, rank,
    nnz or tile count, dtype, layout, contiguous/gathered); ``configs`` are the candidates for that key
    (choosing them per shape is the kernel owner's job; the list is hashed into the disk key too). Within
    a process the candidates must be a function of ``name`` and ``key``: after the first call, a call
    with the same kernel and key returns the remembered config without hashing anything (a few µs).

    ``run(config)`` launches the kernel once with ``config``. On CUDA each candidate is launched a few
    times (warm-up, which compiles, then a median of CUDA-event timings); a candidate whose launch raises
    (too much shared memory, ...) is skipped. So ``run`` must write only buffers that the real launch
    overwrites, or scratch: restoring outputs is the caller's job (a kernel that accumulates into its
    output, e.g. with ``tl.atomic_add``, must get a zeroed output again before the real launch).
    Under ``TRITON_INTERPRET=1`` nothing is timed: the first candidate is taken and ``run`` is not called,
    but the entry is written and read the same way. Two processes tuning the same key at once: the second
    waits for the first's entry (see :func:`fxsparse.codegen.cache.tuning_lock`).
    """
    from fxsparse.codegen import cache

    if not configs:
        raise ValueError(f"no candidate configs for kernel {name!r}")
    fast_key = (name, id(kernel), tuple(key.items()), _where())
    try:
        hit = _FAST.get(fast_key)
    except TypeError:  # an unhashable key value: fall back to its text
        fast_key = (name, id(kernel), tuple((k, str(v)) for k, v in key.items()), _where())
        hit = _FAST.get(fast_key)
    if hit is not None:
        cache.count_hit()
        _remember(hit[1], hit[2], new=False)
        return hit[2].config
    configs = list(configs)
    full_key = cache.full_key(name, kernel, key, configs)
    digest = cache.digest(full_key)
    with _GUARD:
        record = _PICKED.get(digest)
    if record is not None:
        cache.count_hit()
        _remember(digest, record, new=False)
    else:
        record = _resolve(name, full_key, configs, run)
        _remember(digest, record, new=True)
    with _GUARD:
        _FAST[fast_key] = (kernel, digest, record)
    return record.config


def _where() -> tuple:
    """What besides the key decides the entry within this process: interpreter, or which GPU."""
    if interpreting():
        return ("interpreter",)
    if torch.cuda.is_available():
        return ("cuda", torch.cuda.current_device())
    return ("cpu",)


def _resolve(name: str, full_key: Mapping[str, Any], configs: Sequence[Config],
             run: Callable[[Config], None]) -> TuneRecord:
    """Disk entry or fresh tuning (stored), under the key's lock."""
    from fxsparse.codegen import cache

    with cache.tuning_lock(full_key):
        # Read under the lock: a process that waited for another one tuning this key finds its entry here.
        record = _from_entry(name, full_key, cache.read_entry(full_key), configs)
        if record is not None:
            cache.count_hit()
        else:
            cache.count_miss()
            record = _tune(name, full_key, configs, run)
            cache.count_tuned()
            cache.store(full_key, {"config": record.config.to_dict(), "best_ms": record.best_ms,
                                   "candidates": [{"config": c.to_dict(), "ms": ms} for c, ms in record.timings]})
    return record


def _from_entry(name: str, full_key: Mapping[str, Any], entry: Mapping[str, Any] | None,
                configs: Sequence[Config]) -> TuneRecord | None:
    from fxsparse.codegen import cache

    if entry is None:
        return None
    try:
        config = Config.from_dict(entry["config"])
        best = entry.get("best_ms")
        best_ms = None if best is None else float(best)
    except (KeyError, TypeError, ValueError) as exc:
        cache.report_bad_entry(full_key, f"bad config: {type(exc).__name__}: {exc}")
        return None
    if config not in configs:
        cache.report_bad_entry(full_key, f"its config {config.to_dict()} is not a candidate")
        return None
    timings = []
    for item in entry.get("candidates") or ():
        try:
            ms = item.get("ms")
            timings.append((Config.from_dict(item["config"]), None if ms is None else float(ms)))
        except (AttributeError, KeyError, TypeError, ValueError):
            timings = []  # the timings are only informative: a damaged list does not cost the entry
            break
    return TuneRecord(name, dict(full_key["key"]), config, best_ms, "disk", tuple(timings))


def _tune(name: str, full_key: Mapping[str, Any], configs: Sequence[Config],
          run: Callable[[Config], None]) -> TuneRecord:
    shape_key = dict(full_key["key"])
    if interpreting() or not torch.cuda.is_available():
        return TuneRecord(name, shape_key, configs[0], None, "tuned", tuple((c, None) for c in configs))
    timings: list[tuple[Config, float | None]] = []
    failure: Exception | None = None
    for config in configs:
        try:
            timings.append((config, _median_ms(lambda config=config: run(config))))
        except Exception as exc:  # a config the compiler rejects (too much shared memory, ...) is just not a candidate
            failure = exc
            timings.append((config, None))
    valid = [(ms, i) for i, (_, ms) in enumerate(timings) if ms is not None]
    if not valid:
        raise RuntimeError(f"every candidate config of kernel {name!r} failed to launch for {shape_key}") from failure
    best_ms, best = min(valid)
    return TuneRecord(name, shape_key, configs[best], best_ms, "tuned", tuple(timings))


def _median_ms(fn: Callable[[], None], warmup: int = 2, budget_ms: float = 50.0) -> float:
    """Median CUDA-event time of ``fn`` in ms: ``warmup`` calls (the first compiles), then as many timed
    calls as fit in about ``budget_ms`` (5 to 50)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    repeats = 5
    while len(times) < repeats:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
        if len(times) == 1:
            repeats = max(5, min(50, int(budget_ms / max(times[0], 1e-3))))
    times.sort()
    return times[len(times) // 2]
