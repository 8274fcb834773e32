"""What every benchmark row records about where it ran: device name, git revision, load.

A row's ``git_rev`` is ``git describe --always --dirty``: a result measured on uncommitted code says so.
:func:`require_clean_tree` stops a benchmark that would append such a row unless told ``--allow-dirty``.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch

__all__ = ["cpu_name", "device_name", "git_rev", "require_clean_tree", "load_average"]


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
    """``git describe --always --dirty`` of the checkout the benchmarks live in (``unknown`` outside git)."""
    try:
        proc = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=10"], capture_output=True,
                              text=True, cwd=Path(__file__).resolve().parent)
    except OSError:
        return "unknown"
    return proc.stdout.strip() or "unknown"


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
