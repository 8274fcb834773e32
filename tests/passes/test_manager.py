"""The pass manager and the package layout it lives in."""

import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from fxsparse.passes.manager import PassError, PassManager, PassResult


@dataclass
class _State:
    log: list = field(default_factory=list)


def _first(state):
    state.log.append("first")
    return PassResult(True, "did one thing")


def _second(state):
    state.log.append("second")
    return PassResult(False)


def _broken(state):
    raise KeyError("boom")


def _bad_input(state):
    raise ValueError("ratio for 'o' must be in [0, 1]")


def test_runs_in_order_and_records_results():
    lines = []
    manager = PassManager([_first, _second], log=lines.append)
    state = manager.run(_State())
    assert state.log == ["first", "second"]
    assert [(name, r.modified) for name, r, _ in manager.results] == [("_first", True), ("_second", False)]
    assert lines == ["_first: modified did one thing", "_second: unchanged"]


def test_error_names_the_failing_pass_and_those_before_it():
    with pytest.raises(PassError, match=r"pass '_broken' failed \(after \['_first', '_second'\]\)"):
        PassManager([_first, _second, _broken]).run(_State())


def test_value_errors_pass_through_unchanged():
    with pytest.raises(ValueError, match="ratio for 'o'"):
        PassManager([_first, _bad_input]).run(_State())


def test_verify_runs_after_every_pass():
    seen = []
    PassManager([_first, _second], verify=lambda s: seen.append(list(s.log))).run(_State())
    assert seen == [["first"], ["first", "second"]]

    def failing_verify(state):
        if "second" in state.log:
            raise AssertionError("graph broken")

    with pytest.raises(PassError, match="_second"):
        PassManager([_first, _second], verify=failing_verify).run(_State())


def test_a_pass_must_return_a_pass_result():
    with pytest.raises(PassError, match="returned NoneType"):
        PassManager([lambda s: None]).run(_State())


def test_packages_install_under_fxsparse_only(tmp_path):
    """passes/ and codegen/ are importable as fxsparse.passes / fxsparse.codegen, never top level (run
    outside the source tree, where the repository root is not on sys.path)."""
    code = ("import importlib.util as u; "
            "print(u.find_spec('fxsparse.passes') is not None, u.find_spec('fxsparse.codegen') is not None, "
            "u.find_spec('passes') is None, u.find_spec('codegen') is None)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["True"] * 4, out.stderr
