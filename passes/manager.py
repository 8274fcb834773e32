"""The pass manager: runs a recipe's passes in order over one shared state.

A pass is a plain function ``pass_fn(state) -> PassResult``; it reads what earlier passes put on the
state (the captured graph, the Structure, the Plan, the config) and stores what it produced there.
On error the manager re-raises with the names of the passes that already ran.

>>> from dataclasses import dataclass
>>> @dataclass
... class State:
...     value: int = 0
>>> def add_one(state):
...     state.value += 1
...     return PassResult(modified=True)
>>> PassManager([add_one, add_one]).run(State()).value
2
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["PassResult", "PassManager", "PassError"]


@dataclass(frozen=True)
class PassResult:
    """What a pass reports: whether it changed the graph/model, and anything worth printing."""

    modified: bool
    info: str = ""


class PassError(RuntimeError):
    """A pass failed; the message names it and the passes that ran before it."""


class PassManager:
    """Runs ``passes`` in order; ``verify`` (if given) is called on the state after each pass."""

    def __init__(
        self,
        passes: Sequence[Callable[[Any], PassResult]],
        verify: Callable[[Any], None] | None = None,
        log: Callable[[str], None] | None = None,
    ):
        self.passes = list(passes)
        self.verify = verify
        self.log = log
        self.results: list[tuple[str, PassResult, float]] = []

    def run(self, state: Any) -> Any:
        done: list[str] = []
        for pass_fn in self.passes:
            name = getattr(pass_fn, "__name__", repr(pass_fn))
            start = time.perf_counter()
            try:
                result = pass_fn(state)
                if self.verify is not None:
                    self.verify(state)
            except ValueError:
                raise  # bad user input: the pass's own message says what is wrong
            except Exception as exc:
                raise PassError(f"pass {name!r} failed (after {done or 'no passes'}): {exc}") from exc
            elapsed = time.perf_counter() - start
            if not isinstance(result, PassResult):
                raise PassError(f"pass {name!r} returned {type(result).__name__}, not PassResult")
            self.results.append((name, result, elapsed))
            if self.log is not None:
                self.log(f"{name}: {'modified' if result.modified else 'unchanged'} {result.info}".rstrip())
            done.append(name)
        return state
