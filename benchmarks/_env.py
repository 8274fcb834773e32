"""What every benchmark row records about where it ran: device name, git revision, load."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch

__all__ = ["cpu_name", "device_name", "git_rev", "load_average"]


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
    """Short revision of the checkout the benchmarks live in (``unknown`` outside git)."""
    try:
        proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent)
    except OSError:
        return "unknown"
    return proc.stdout.strip() or "unknown"


def load_average() -> float:
    """1-minute load average (NaN where /proc/loadavg does not exist)."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")
