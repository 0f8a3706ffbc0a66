"""Run a test module as a script in a child process with several host CPU devices.

``XLA_FLAGS=--xla_force_host_platform_device_count=N`` takes effect only before jax
is first imported, and pytest has imported it already. So a module that needs N
devices is also a script: its ``__main__`` computes, prints one line ``RECORDS
<json>``, and its tests call :func:`run_as_script` and assert on the records. Nothing
leaks into the test process.

Within one pytest run (the root conftest.py names a directory in
``JAX_ORTHOPENALTY_RECORDS_DIR``) a script runs once: the first xdist worker to ask
runs it under a file lock and keeps its records there; the others wait and read them.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "RECORDS "
RECORDS_DIR = "JAX_ORTHOPENALTY_RECORDS_DIR"


def run_as_script(module_file: str, *, devices: int = 8, timeout: float = 240) -> Any:
    """Runs ``python module_file`` with ``devices`` host devices; returns its records
    (once per pytest run, shared by the workers: see the module docstring)."""
    shared = os.environ.get(RECORDS_DIR)
    if shared is None:
        return _run(module_file, devices, timeout)
    path = Path(shared) / f"{Path(module_file).stem}-{devices}.json"
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if path.exists():
            return json.loads(path.read_text())
        records = _run(module_file, devices, timeout)  # a failure writes nothing
        path.write_text(json.dumps(records))
        return records


def _run(module_file: str, devices: int, timeout: float) -> Any:
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
