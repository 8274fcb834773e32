"""Kernel selection and autotuning: which implementation runs an op, and which Triton config it uses.

``FXSPARSE_KERNELS`` (read at every call, so a test can switch it between two calls) picks the op
implementation: ``auto`` (default: Triton on CUDA tensors, torch on CPU), ``triton`` (Triton everywhere;
with ``TRITON_INTERPRET=1`` the kernels run on CPU tensors) or ``torch`` (plain torch everywhere).

:func:`pick_config` chooses a kernel's launch configuration for one specialisation key (shapes, dtype,
layout): from this process's memory, else from the on-disk cache (:mod:`fxsparse.codegen.cache`), else by
timing every candidate once (CUDA events, median) and storing the winner. Under the interpreter there
is no driver to time with: the first candidate is taken, but the cache is written and read the same way.

>>> import os
>>> os.environ["FXSPARSE_KERNELS"] = "torch"
>>> kernels_mode()
'torch'
>>> del os.environ["FXSPARSE_KERNELS"]
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Config", "MODES", "kernels_mode", "interpreting", "triton_available", "use_triton", "pick_config"]

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
        return cls(dict(data["kwargs"]), int(data["num_warps"]), int(data["num_stages"]))

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


_MEMORY: dict[str, Config] = {}


def pick_config(
    name: str,
    kernel: Any,
    key: Mapping[str, Any],
    configs: Sequence[Config],
    run: Callable[[Config], None],
) -> Config:
    """The launch config for ``kernel`` at specialisation ``key`` (memory → disk cache → tune).

    ``name`` names the kernel (``"sltrain_block_fwd"``); ``kernel`` is the ``@triton.jit`` function (its
    source is hashed into the cache key, so editing a kernel invalidates its entries); ``key`` holds the
    shapes, dtypes and layout that select the specialisation; ``run(config)`` launches the kernel once
    with ``config``: it is called several times while tuning, so it must write only into buffers that
    the real launch overwrites (or scratch).
    """
    from fxsparse.codegen import cache

    if not configs:
        raise ValueError(f"no candidate configs for kernel {name!r}")
    full_key = cache.full_key(name, kernel, key)
    digest = cache.digest(full_key)
    found = _MEMORY.get(digest)
    if found is not None:
        cache.count_hit()
        return found
    entry = cache.lookup(full_key)
    if entry is not None:
        try:
            config = Config.from_dict(entry["config"])
        except (KeyError, TypeError, ValueError):
            config = None
        if config is not None:
            _MEMORY[digest] = config
            return config
    config, timings = _tune(configs, run)
    cache.store(full_key, {"config": config.to_dict(), "timings_ms": timings})
    _MEMORY[digest] = config
    return config


def _tune(configs: Sequence[Config], run: Callable[[Config], None]) -> tuple[Config, list[float | None]]:
    if interpreting() or not torch.cuda.is_available() or len(configs) == 1:
        return configs[0], [None] * len(configs)
    timings: list[float | None] = []
    for config in configs:
        try:
            timings.append(_median_ms(lambda config=config: run(config)))
        except Exception:  # a config the compiler rejects (too much shared memory, ...) is just not a candidate
            timings.append(None)
    valid = [(t, i) for i, t in enumerate(timings) if t is not None]
    if not valid:
        raise RuntimeError("every candidate config failed to launch")
    return configs[min(valid)[1]], timings


def _median_ms(fn: Callable[[], None], warmup: int = 3, repeats: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    times.sort()
    return times[len(times) // 2]
