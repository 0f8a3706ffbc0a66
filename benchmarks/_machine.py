"""What every benchmark records about where it ran: the machine and the package."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import jax

import jax_orthopenalty as jop


def package_location() -> str:
    """Where the benchmarked package lives: this checkout's, or another copy."""
    package = Path(jop.__file__).resolve().parent
    root = Path(__file__).resolve().parents[1]
    return str(package.relative_to(root)) if package.is_relative_to(root) else "another copy"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return model


def machine() -> dict[str, Any]:
    """CPU, cores, platform, Python, jax, backend, devices and the package's location."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "package": package_location(),
    }
