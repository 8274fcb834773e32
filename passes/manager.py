"""The pass interface and the pass manager.

A pass is a plain function decorated with :func:`fxpass`, which declares what it reads and writes:

- ``reads``: names of values in the shared *context* (``model``, ``example_inputs``, ``captured``,
  ``structure``, ``plan``, ... — and ``graph`` for passes over a dynamo or AOT graph); they are the
  function's parameters;
- ``options``: fields of the recipe's config dataclass the pass takes as keyword parameters (a pass
  parameter with a default may be missing from a config);
- ``writes``: names the pass produces; it returns ``PassResult(modified, info, outputs)`` with
  ``outputs`` holding exactly those names (a pass that changes the model in place writes ``model``);
- order constraints beyond the data dependencies (which the manager derives from ``reads``/``writes``):
  ``after`` / ``before`` name passes that, when in the same pipeline, must run earlier / later;
  ``after_writes`` / ``before_writes`` name values: the pass runs after / before every pass of the
  pipeline that writes one of them (``check_function`` runs after everything that writes ``model``,
  ``record_reference`` before it).

:class:`PassManager` checks a pipeline when it is built (every read is an input or written by an
earlier pass, ``after`` holds, every option exists), runs it over a context dict, and re-raises an
error with the names of the passes that already ran, after calling the ``undo`` of each pass that
finished, latest first. ``python -m fxsparse.passes --list`` prints every pass with its inputs and
outputs.

>>> @fxpass(reads=("numbers",), writes=("total",), options=("offset",))
... def add_up(numbers, offset=0):
...     '''Sum the numbers.'''
...     return PassResult(False, outputs={"total": sum(numbers) + offset})
>>> @fxpass(reads=("total",), writes=("doubled",))
... def double(total):
...     '''Twice the total.'''
...     return PassResult(False, outputs={"doubled": 2 * total})
>>> PassManager([add_up, double], inputs=("numbers",)).run({"numbers": [1, 2, 3]})["doubled"]
12
>>> try:
...     PassManager([double, add_up], inputs=("numbers",))
... except PassOrderError as exc:
...     print(exc)
pass 'double' reads ['total'], which neither the inputs ['numbers'] nor an earlier pass provide
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PassResult", "PassSpec", "PassManager", "PassError", "PassValueError", "PassOrderError", "fxpass",
           "spec_of", "check_pipeline"]

_SPEC = "__fxpass__"


@dataclass(frozen=True)
class PassResult:
    """What a pass returns.

    ``modified``: whether it changed the model or graph; ``info``: one line worth printing; ``outputs``:
    the values it produced, keyed by the names it declared in ``writes``; ``undo``: reverts the tensor
    data the pass changed in place (a permutation folded into weights), called by the manager if a later
    pass fails. Module swaps and ``requires_grad`` flags are restored by ``fxsparse.transform``'s
    snapshot of the module tree, so passes that only do those return no ``undo``.
    """

    modified: bool
    info: str = ""
    outputs: Mapping[str, Any] = field(default_factory=dict)
    undo: Callable[[], None] | None = None


@dataclass(frozen=True)
class PassSpec:
    """What :func:`fxpass` attaches to a pass function."""

    name: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    options: tuple[str, ...]
    after: tuple[str, ...]
    before: tuple[str, ...]
    after_writes: tuple[str, ...]
    before_writes: tuple[str, ...]
    defaults: Mapping[str, Any]  # option -> default, for options that have one
    summary: str


class PassError(RuntimeError):
    """A pass failed; the message names it and the passes that ran before it."""


class PassValueError(PassError, ValueError):
    """A pass rejected its input (bad options, a plan for another model); a ``ValueError`` as well."""


class PassOrderError(ValueError):
    """A pipeline whose passes read something no earlier pass writes, or break an ``after`` constraint."""


def _names(values: Iterable[str], what: str) -> tuple[str, ...]:
    values = (values,) if isinstance(values, str) else tuple(values)
    if not all(isinstance(v, str) and v.isidentifier() for v in values):
        raise TypeError(f"{what} must be identifiers, got {values!r}")
    return values


def fxpass(*, reads: Sequence[str], writes: Sequence[str], options: Sequence[str] = (),
           after: Sequence[str] = (), before: Sequence[str] = (), after_writes: Sequence[str] = (),
           before_writes: Sequence[str] = ()) -> Callable[[Callable[..., PassResult]], Callable[..., PassResult]]:
    """Declare a function a pass (see the module docstring); its parameters must be ``reads + options``."""
    reads, writes, options = _names(reads, "reads"), _names(writes, "writes"), _names(options, "options")
    order = {key: _names(value, key) for key, value in (("after", after), ("before", before),
                                                          ("after_writes", after_writes),
                                                          ("before_writes", before_writes))}

    def decorate(fn: Callable[..., PassResult]) -> Callable[..., PassResult]:
        params = inspect.signature(fn).parameters
        if set(params) != set(reads) | set(options) or set(reads) & set(options):
            raise TypeError(f"pass {fn.__name__!r}: parameters {list(params)} must be its reads {list(reads)} "
                            f"plus its options {list(options)}")
        defaults = {name: p.default for name, p in params.items()
                    if name in options and p.default is not inspect.Parameter.empty}
        summary = (inspect.getdoc(fn) or "").split("\n", 1)[0]
        setattr(fn, _SPEC, PassSpec(fn.__name__, reads, writes, options, defaults=defaults, summary=summary,
                                    **order))
        return fn

    return decorate


def spec_of(pass_fn: Callable[..., PassResult]) -> PassSpec:
    """The :class:`PassSpec` of a pass function (``TypeError`` for a function not declared with fxpass)."""
    spec = getattr(pass_fn, _SPEC, None)
    if not isinstance(spec, PassSpec):
        raise TypeError(f"{getattr(pass_fn, '__name__', pass_fn)!r} is not a pass (declare it with @fxpass)")
    return spec


def _config_fields(config_cls: type) -> set[str]:
    if dataclasses.is_dataclass(config_cls):
        return {f.name for f in dataclasses.fields(config_cls)}
    return set(getattr(config_cls, "__annotations__", {}))


def check_pipeline(passes: Sequence[Callable[..., PassResult]], inputs: Iterable[str],
                   config_cls: type | None = None) -> None:
    """``PassOrderError`` unless every pass can run where it stands (see the module docstring)."""
    available = set(inputs)
    specs = [spec_of(p) for p in passes]
    fields = _config_fields(config_cls) if config_cls is not None else None
    for i, spec in enumerate(specs):
        earlier, later = specs[:i], specs[i + 1:]
        missing = [name for name in spec.reads if name not in available]
        if missing:
            raise PassOrderError(f"pass {spec.name!r} reads {missing}, which neither the inputs "
                                 f"{sorted(set(inputs))} nor an earlier pass provide")
        wrong = ([s.name for s in later if s.name in spec.after]
                 + [s.name for s in earlier if s.name in spec.before]
                 + [s.name for s in later if set(s.writes) & set(spec.after_writes)]
                 + [s.name for s in earlier if set(s.writes) & set(spec.before_writes)])
        if wrong:
            raise PassOrderError(f"pass {spec.name!r} is out of order with {wrong} (after {list(spec.after)}, "
                                 f"before {list(spec.before)}, after writers of {list(spec.after_writes)}, "
                                 f"before writers of {list(spec.before_writes)})")
        if fields is not None:
            lacking = [o for o in spec.options if o not in fields and o not in spec.defaults]
            if lacking:
                raise PassOrderError(f"pass {spec.name!r} needs option(s) {lacking}, which "
                                     f"{config_cls.__name__} lacks")
        available.update(spec.writes)


class PassManager:
    """Runs ``passes`` in order over a context dict.

    ``inputs``: the names the context holds before the first pass; ``config_cls``: the recipe's config
    dataclass, checked against the passes' options (the config itself is the context's ``config``);
    ``verify``: called with the context after every pass (a debugging aid); ``log``: receives one line
    per pass.
    """

    def __init__(
        self,
        passes: Sequence[Callable[..., PassResult]],
        inputs: Iterable[str] = ("model", "config", "example_inputs"),
        config_cls: type | None = None,
        verify: Callable[[dict], None] | None = None,
        log: Callable[[str], None] | None = None,
    ):
        self.passes = tuple(passes)
        self.inputs = tuple(inputs)
        check_pipeline(self.passes, self.inputs, config_cls)
        self.verify = verify
        self.log = log
        self.results: list[tuple[str, PassResult, float]] = []
        self._undo: list[tuple[str, Callable[[], None]]] = []

    def run(self, context: dict[str, Any]) -> dict[str, Any]:
        """Run every pass; returns ``context`` with every pass's outputs added."""
        missing = [name for name in self.inputs if name not in context]
        if missing:
            raise ValueError(f"pass manager inputs {missing} are missing from the context")
        config = context.get("config")
        done: list[str] = []
        for pass_fn in self.passes:
            spec = spec_of(pass_fn)
            kwargs = {name: context[name] for name in spec.reads}
            kwargs.update({name: getattr(config, name) for name in spec.options if hasattr(config, name)})
            start = time.perf_counter()
            try:
                result = pass_fn(**kwargs)
                if not isinstance(result, PassResult):
                    raise TypeError(f"returned {type(result).__name__}, not PassResult")
                if set(result.outputs) != set(spec.writes):
                    raise TypeError(f"returned outputs {sorted(result.outputs)}, declared {sorted(spec.writes)}")
                if result.undo is not None:
                    self._undo.append((spec.name, result.undo))
                context.update(result.outputs)
                if self.verify is not None:
                    self.verify(context)
            except Exception as exc:
                problems = self.rollback()
                kind = PassValueError if isinstance(exc, ValueError) else PassError
                message = f"pass {spec.name!r} failed (after {done or 'no passes'}): {exc}"
                if problems:
                    message += f"; undoing the passes before it also failed: {problems}"
                raise kind(message) from exc
            except BaseException:
                self.rollback()
                raise
            elapsed = time.perf_counter() - start
            self.results.append((spec.name, result, elapsed))
            if self.log is not None:
                self.log(f"{spec.name}: {'modified' if result.modified else 'unchanged'} {result.info}".rstrip())
            done.append(spec.name)
        return context

    def rollback(self) -> list[str]:
        """Call the ``undo`` of every finished pass, latest first (once); returns the failures, if any."""
        problems = []
        while self._undo:
            name, undo = self._undo.pop()
            try:
                undo()
            except Exception as exc:  # keep undoing the others: each restores its own tensors
                problems.append(f"{name}: {type(exc).__name__}: {exc}")
        return problems
