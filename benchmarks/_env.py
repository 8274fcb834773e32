"""What every benchmark row records about where it ran: device name, git revision, load.

A row's ``git_rev`` is the commit plus ``-dirty`` when the code has uncommitted changes: a result measured on
uncommitted code says so.
:func:`require_clean_tree` stops a benchmark that would append such a row unless told ``--allow-dirty``.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

__all__ = ["append_rows", "base_model", "cpu_name", "device_name", "git_rev", "load_average", "read_rows",
           "require_clean_tree"]


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (``AMD EPYC ...``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name() -> str:
    """The GPU's name when CUDA is available, else ``<cpu model> (CPU)``."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{cpu_name()} (CPU)"


def git_rev() -> str:
    """Short revision of the checkout the benchmarks live in, ``-dirty`` when its code has uncommitted changes.

    Like ``git describe --always --dirty``, except that result files under ``benchmarks/results`` do not count:
    one benchmark's freshly appended rows must not mark the next benchmark's rows dirty. ``unknown`` outside
    git; ``$FXSPARSE_GIT_REV`` names the code where ``.git`` is absent (a copied tree on a GPU machine).
    """
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True, cwd=here)
        status = subprocess.run(["git", "status", "--porcelain", "--", ":/", ":(exclude,top)benchmarks/results"],
                                capture_output=True, text=True, cwd=here)
    except OSError:
        rev = status = None
    if rev is None or rev.returncode != 0 or not rev.stdout.strip():
        return os.environ.get("FXSPARSE_GIT_REV", "unknown")
    return rev.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def require_clean_tree(allow_dirty: bool) -> None:
    """Refuse (SystemExit) to record results from a checkout with uncommitted changes, unless allowed."""
    rev = git_rev()
    if rev.endswith("-dirty") and not allow_dirty:
        raise SystemExit(f"the checkout has uncommitted changes ({rev}): commit first so each result row names the "
                         "code that produced it, or pass --allow-dirty to record it as such")


def load_average() -> float:
    """1-minute load average (NaN where /proc/loadavg does not exist)."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def base_model(tiny: bool):
    """``(model, name)``: a tiny random LLaMA for smoke runs, else SmolLM2-135M-Instruct (float32)."""
    if tiny:
        from fxsparse.models import tiny_model

        return tiny_model("llama"), "tiny-llama"
    from fxsparse.app.models import load_default_model

    return load_default_model()[0], "SmolLM2-135M-Instruct"


def append_rows(path: Path, fields: list[str], rows: list[dict]) -> None:
    """Append ``rows`` to the CSV at ``path`` (header written when the file is new; missing fields blank)."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def read_rows(path: Path) -> list[dict]:
    """Every row of the CSV at ``path``."""
    import csv

    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))
