"""bench/environment.py: every bench result records the versions, GPU, driver, date and command it was measured with,
without importing the heavy packages it reports on."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

from bench.environment import PACKAGES, earlier_environments, environment

ROOT = Path(__file__).resolve().parents[1]


def test_environment_reads_versions_without_importing_them() -> None:
    code = ("import json, sys; from bench.environment import environment; "
            "env = environment(['bench/train_12b.py', '--points', '2048']); "
            "print(json.dumps({'env': env, 'imported': [m for m in ('torch', 'numpy', 'transformers', 'llama_cpp') "
            "if m in sys.modules]}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    out = json.loads(result.stdout)
    env = out["env"]
    assert out["imported"] == []
    assert set(PACKAGES) | {"python", "gpu", "driver", "date", "command"} <= set(env)
    assert env["command"] == "python -m bench.train_12b --points 2048"
    for key, distribution in PACKAGES.items():
        try:
            assert env[key] == importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            assert env[key] is None
    assert env["gpu"] == "cpu" or env["gpu"].strip()


def test_a_resumed_result_keeps_the_earlier_calls_environments(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    assert earlier_environments(out) == []
    first = environment(["first"])
    out.write_text(json.dumps({"environment": first, "earlier_environments": []}))
    second = environment(["second"])
    out.write_text(json.dumps({"environment": second, "earlier_environments": earlier_environments(out)}))
    assert [e["command"] for e in earlier_environments(out)] == ["first", "second"]


def test_every_bench_that_writes_a_result_records_its_environment() -> None:
    writers = [path for path in sorted((ROOT / "bench").glob("*.py"))
               if re.search(r"""["']?benchmark["']?\s*[:=]\s*["']""", path.read_text())]
    assert len(writers) >= 7, writers
    for path in writers:
        assert "environment(sys.argv)" in path.read_text(), path


def test_the_module_examples_hold() -> None:
    import doctest

    import bench.environment

    assert doctest.testmod(bench.environment).failed == 0
