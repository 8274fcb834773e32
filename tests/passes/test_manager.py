"""The pass interface, the pass manager, ``--list`` and the package layout they live in."""

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from fxsparse.passes.manager import (
    PassError,
    PassManager,
    PassOrderError,
    PassResult,
    PassValueError,
    check_pipeline,
    fxpass,
    spec_of,
)


@fxpass(reads=("numbers",), writes=("total",), options=("offset",))
def _add_up(numbers, offset=0):
    """Sum the numbers plus an offset."""
    return PassResult(False, "summed", outputs={"total": sum(numbers) + offset})


@fxpass(reads=("numbers", "total"), writes=("numbers",))
def _append_total(numbers, total):
    """Append the total, in place."""
    numbers.append(total)
    return PassResult(True, outputs={"numbers": numbers}, undo=numbers.pop)


@fxpass(reads=("numbers",), writes=())
def _broken(numbers):
    """Always fails."""
    raise KeyError("boom")


@fxpass(reads=("numbers",), writes=())
def _bad_input(numbers):
    """Rejects its input."""
    raise ValueError("ratio for 'o' must be in [0, 1]")


@dataclass(frozen=True)
class _Config:
    offset: int = 10


def test_runs_in_order_with_options_from_the_config():
    lines = []
    manager = PassManager([_add_up, _append_total], inputs=("numbers", "config"), config_cls=_Config,
                          log=lines.append)
    context = manager.run({"numbers": [1, 2], "config": _Config(offset=4)})
    assert context["numbers"] == [1, 2, 7] and context["total"] == 7
    assert [(name, r.modified) for name, r, _ in manager.results] == [("_add_up", False), ("_append_total", True)]
    assert lines == ["_add_up: unchanged summed", "_append_total: modified"]


def test_an_option_missing_from_the_config_takes_the_pass_default():
    @dataclass(frozen=True)
    class Empty:
        pass

    context = PassManager([_add_up], inputs=("numbers", "config"), config_cls=Empty).run(
        {"numbers": [1, 2], "config": Empty()})
    assert context["total"] == 3


def test_error_names_the_failing_pass_and_undoes_those_before_it():
    numbers = [1, 2]
    manager = PassManager([_add_up, _append_total, _broken], inputs=("numbers",))
    with pytest.raises(PassError, match=r"pass '_broken' failed \(after \['_add_up', '_append_total'\]\)"):
        manager.run({"numbers": numbers})
    assert numbers == [1, 2]  # _append_total's undo ran


def test_value_errors_stay_value_errors_with_their_message():
    with pytest.raises(ValueError, match="ratio for 'o'") as info:
        PassManager([_add_up, _bad_input], inputs=("numbers",)).run({"numbers": [1]})
    assert isinstance(info.value, PassValueError) and "_bad_input" in str(info.value)


def test_outputs_must_be_exactly_what_the_pass_declares():
    @fxpass(reads=("numbers",), writes=("total",))
    def forgets(numbers):
        """Declares total, returns nothing."""
        return PassResult(False)

    @fxpass(reads=("numbers",), writes=())
    def returns_none(numbers):
        """Not a PassResult."""

    with pytest.raises(PassError, match=r"returned outputs \[\], declared \['total'\]"):
        PassManager([forgets], inputs=("numbers",)).run({"numbers": []})
    with pytest.raises(PassError, match="returned NoneType, not PassResult"):
        PassManager([returns_none], inputs=("numbers",)).run({"numbers": []})


def test_pipeline_is_checked_before_anything_runs():
    with pytest.raises(PassOrderError, match=r"'_append_total' reads \['total'\]"):
        PassManager([_append_total, _add_up], inputs=("numbers",))

    @dataclass(frozen=True)
    class NoOffset:
        scale: int = 1

    @fxpass(reads=("numbers",), writes=(), options=("scale", "width"))
    def needs_width(numbers, scale, width):
        """Options without defaults must exist in the config."""
        return PassResult(False)

    with pytest.raises(PassOrderError, match=r"needs option\(s\) \['width'\], which NoOffset lacks"):
        check_pipeline([needs_width], ("numbers",), NoOffset)
    with pytest.raises(ValueError, match=r"inputs \['numbers'\] are missing"):
        PassManager([_add_up], inputs=("numbers",)).run({})


def test_order_constraints_by_name_and_by_written_value():
    @fxpass(reads=("numbers",), writes=(), after_writes=("numbers",))
    def check(numbers):
        """Must see the final numbers."""
        return PassResult(False)

    @fxpass(reads=("numbers",), writes=(), before=("_append_total",))
    def early(numbers):
        """Must run before _append_total."""
        return PassResult(False)

    check_pipeline([_add_up, early, _append_total, check], ("numbers",))
    with pytest.raises(PassOrderError, match=r"'check' is out of order with \['_append_total'\]"):
        check_pipeline([_add_up, check, _append_total], ("numbers",))
    with pytest.raises(PassOrderError, match=r"'early' is out of order with \['_append_total'\]"):
        check_pipeline([_add_up, _append_total, early], ("numbers",))


def test_verify_runs_after_every_pass():
    seen = []
    PassManager([_add_up, _append_total], inputs=("numbers",),
                verify=lambda context: seen.append(list(context["numbers"]))).run({"numbers": [1]})
    assert seen == [[1], [1, 1]]


def test_a_pass_declares_exactly_its_parameters():
    with pytest.raises(TypeError, match="must be its reads"):
        @fxpass(reads=("numbers",), writes=())
        def extra(numbers, other):
            """Has an undeclared parameter."""

    with pytest.raises(TypeError, match="is not a pass"):
        spec_of(print)
    assert spec_of(_add_up).defaults == {"offset": 0} and spec_of(_add_up).summary == "Sum the numbers plus an offset."


def _run_module(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_list_prints_every_pass_with_inputs_and_outputs(tmp_path):
    out = _run_module("-m", "fxsparse.passes", "--list", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    listed = {line.split()[0] for line in text.split("recipes:")[0].splitlines()[1:] if line[:1].isalpha()}
    assert {"capture_graph", "find_structure", "record_reference", "select_units", "permute_coupled", "replace_s2ft",
            "recompute_gated_act", "check_function", "replace_sltrain", "train_all_parameters"} <= listed
    section = text.split("select_units  (")[1].split("\n\n")[0]
    assert "reads:   structure, model" in section and "writes:  plan" in section
    assert "options: ratios, select, seed, layers, calibration, plan" in section
    assert ("s2ft (S2FTConfig): capture_graph -> find_structure -> record_reference -> select_units -> "
            "permute_coupled -> replace_s2ft -> recompute_gated_act -> check_function") in text
    assert "lowrank (LowRankConfig): capture_graph -> find_structure -> replace_sltrain" in text


def test_packages_install_under_fxsparse_only(tmp_path):
    """passes/ and codegen/ are importable as fxsparse.passes / fxsparse.codegen, never top level (run
    outside the source tree, where the repository root is not on sys.path)."""
    code = ("import importlib.util as u; "
            "print(u.find_spec('fxsparse.passes') is not None, u.find_spec('fxsparse.codegen') is not None, "
            "u.find_spec('passes') is None, u.find_spec('codegen') is None)")
    out = _run_module("-c", code, cwd=tmp_path)
    assert out.stdout.split() == ["True"] * 4, out.stderr
