"""Every docstring example in the library runs and prints what it says (modules imported by their real names).

``pytest --doctest-modules`` would import ``passes/`` and ``codegen/`` a second time under top-level names
(they install as ``fxsparse.passes`` and ``fxsparse.codegen``), registering every custom op twice; walking the
installed package avoids that.
"""

import doctest
import importlib
import pkgutil

import pytest

import fxsparse
import fxsparse.codegen
import fxsparse.passes


def _modules() -> list[str]:
    # passes/ and codegen/ live outside fxsparse/ in the source tree, so walk each package on its own path
    names = {"fxsparse", "fxsparse.passes", "fxsparse.codegen"}
    for package in (fxsparse, fxsparse.passes, fxsparse.codegen):
        names |= {info.name for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")}
    return sorted(names)


# An example that needs the real model or the network is a bug in the example, so every module is collected.
MODULES = _modules()


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module, name) if t.examples]
    for test in tests:
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} of {results.attempted} docstring examples failed in {name}"
