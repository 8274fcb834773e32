"""``python -m fxsparse.passes --list``: every pass with what it reads and writes, then every recipe.

Passes are found by importing each module of the package and keeping the functions declared with
``@fxpass``, so a new pass file shows up without being registered anywhere.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from fxsparse.passes.manager import spec_of

__all__ = ["all_passes", "describe", "main"]


def all_passes() -> list:
    """Every ``@fxpass`` function of the package, sorted by name."""
    import fxsparse.passes as package

    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for value in vars(module).values():
            if callable(value) and hasattr(value, "__fxpass__") and value.__module__ == module.__name__:
                found[spec_of(value).name] = value
    return [found[name] for name in sorted(found)]


def describe(pass_fn) -> str:
    """Name, summary, reads, options, writes and order constraints of one pass, one per line."""
    spec = spec_of(pass_fn)
    lines = [f"{spec.name}  ({pass_fn.__module__})", f"    {spec.summary}",
             f"    reads:   {', '.join(spec.reads) or '-'}"]
    if spec.options:
        lines.append(f"    options: {', '.join(spec.options)}")
    lines.append(f"    writes:  {', '.join(spec.writes) or '-'}")
    for what, names in (("after", spec.after), ("before", spec.before)):
        if names:
            lines.append(f"    {what + ':':8} {', '.join(names)}")
    for what, names in (("after", spec.after_writes), ("before", spec.before_writes)):
        if names:
            lines.append(f"    {what + ':':8} every pass that writes {', '.join(names)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fxsparse.passes", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--list", action="store_true", help="print every pass and recipe")
    args = parser.parse_args(argv)
    if not args.list:
        parser.print_help()
        return 0
    from fxsparse.recipes import available_recipes, get_recipe

    print("passes:")
    for pass_fn in all_passes():
        print(describe(pass_fn))
    print("\nrecipes:")
    for name in available_recipes():
        print(f"  {get_recipe(name).describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
