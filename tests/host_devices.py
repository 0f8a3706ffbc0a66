"""Run a test module as a script in a child process with several host CPU devices.

``XLA_FLAGS=--xla_force_host_platform_device_count=N`` takes effect only before jax
is first imported, and pytest has imported it already. So a module that needs N
devices is also a script: its ``__main__`` computes, prints one line ``RECORDS
<json>``, and its tests call :func:`run_as_script` and assert on the records. Nothing
leaks into the test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "RECORDS "


def run_as_script(module_file: str, *, devices: int = 8, timeout: float = 240) -> Any:
    """Runs ``python module_file`` with ``devices`` host devices; returns its records."""
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "JAX_ENABLE_X64": "0",
        # The child imports the same checkout as this process, whatever is installed.
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH")])
        ),
    }
    proc = subprocess.run(
        [sys.executable, str(Path(module_file).resolve())],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(PREFIX))
    return json.loads(line.removeprefix(PREFIX))


def print_records(records: Any) -> None:
    """The child's side: print the records for :func:`run_as_script`."""
    print(PREFIX + json.dumps(records))
