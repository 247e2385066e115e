"""What a bench result was measured with: package versions, GPU, driver, date and the command line.

Every bench script that writes a result JSON puts `"environment": environment(sys.argv)` into it, so that a figure in
docs/BENCHMARKS.md can be traced to the versions that produced it. Versions come from the installed distributions'
metadata (`importlib.metadata`): nothing heavy is imported for them, and a bench that keeps torch or numpy out of its
process (bench/eval_speed.py, bench/load_order.py) stays that way. The GPU and driver come from `nvidia-smi`, or from
torch when the process has imported it already; without either the GPU is "cpu".

    >>> env = environment([str(BENCH / "train_12b.py"), "--work", "/tmp/t12", "--points", "2048 tokens"])
    >>> env["command"]
    "python -m bench.train_12b --work /tmp/t12 --points '2048 tokens'"
    >>> set(PACKAGES) <= set(env) and env["python"] == platform.python_version()
    True
    >>> isinstance(env["gpu"], str) and env["date"][:2] == "20"
    True
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# key in the result -> distribution name on PyPI
PACKAGES = {
    "torch": "torch", "transformers": "transformers", "trl": "trl", "peft": "peft", "accelerate": "accelerate",
    "unsloth": "unsloth", "unsloth_zoo": "unsloth-zoo", "bitsandbytes": "bitsandbytes", "liger_kernel": "liger-kernel",
    "datasets": "datasets", "llama_cpp": "llama-cpp-python",
}
BENCH = Path(__file__).resolve().parent


def environment(argv: Sequence[str]) -> dict[str, Any]:
    """Python's and each package's version (None where it is not installed), GPU, driver, CPU, date, command, commit."""
    gpu, driver = _gpu()
    return {
        "python": platform.python_version(),
        **{key: version(name) for key, name in PACKAGES.items()},
        "gpu": gpu,
        "driver": driver,
        "cpu": _cpu(),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command(argv),
        "commit": _commit(),
    }


def earlier_environments(out: Path) -> list[dict[str, Any]]:
    """The environments a results file already holds, oldest first, for a bench that adds this call's results to it
    (a device call is limited in time, so one result file may hold several calls, on more than one machine)."""
    if not out.is_file():
        return []
    previous = json.loads(out.read_text())
    latest = [previous["environment"]] if "environment" in previous else []
    return [*previous.get("earlier_environments", []), *latest]


def version(distribution: str) -> str | None:
    """The installed version of a distribution, without importing it.

    >>> version("no-such-distribution-ft") is None
    True
    """
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def command(argv: Sequence[str]) -> str:
    """The command line as typed: `python -m bench.NAME ...` for a bench module run with -m (argv[0] is its file).

    >>> command(["/repo/tests/x.py", "-k", "a b"])
    "/repo/tests/x.py -k 'a b'"
    """
    if not argv:
        return ""
    script = Path(argv[0])
    if script.suffix == ".py" and script.resolve().parent == BENCH:
        return shlex.join(["python", "-m", f"bench.{script.stem}", *argv[1:]])
    return shlex.join(argv)


@functools.cache
def _gpu() -> tuple[str, str | None]:
    """(GPU name, driver version) from nvidia-smi; else from torch if this process imported it; else ("cpu", None).
    Several GPUs of one kind read "4 x NAME"."""
    try:
        lines = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, check=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        lines = []
    rows = [[part.strip() for part in line.split(",")] for line in lines if line.strip()]
    if rows:
        names = [row[0] for row in rows]
        name = names[0] if len(names) == 1 else (f"{len(names)} x {names[0]}" if len(set(names)) == 1
                                                 else ", ".join(names))
        return name, rows[0][-1] if len(rows[0]) > 1 else None
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name(), None
    return "cpu", None


def _cpu() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or platform.machine())


def _commit() -> str | None:
    """The checkout's commit (`-dirty` with uncommitted changes), or None outside a git checkout (a device copy)."""
    try:
        result = subprocess.run(["git", "-C", str(BENCH), "describe", "--always", "--dirty", "--abbrev=12"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return (result.stdout.strip() or None) if result.returncode == 0 else None
