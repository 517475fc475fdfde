"""The README's examples run as written: its Python snippet and its offline quickstart commands."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(kind: str, after: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", README[README.index(after):], flags=re.S)


def test_python_snippet_runs_as_written() -> None:
    (snippet,) = _blocks("python", "## Use")[:1]
    module = types.ModuleType("readme_snippet")
    exec(compile(snippet, "README.md", "exec"), module.__dict__)       # noqa: S102  (the README's own code)
    assert module.loss.ndim == 0 and module.student.fc.weight.grad is not None


def test_offline_quickstart_runs_as_written(tmp_path: Path) -> None:
    (block,) = _blocks("bash", "### Offline quickstart")[:1]
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KDFORGE_CACHE": str(tmp_path / "cache")}
    commands = [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
    assert len(commands) >= 10 and all(c.startswith("kdforge ") for c in commands)
    for command in commands:
        argv = [sys.executable, "-m", "kdforge.cli", *shlex.split(command)[1:]]
        proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-1500:]}"
    for run in ("qs-teacher", "qs-student", "qs-kd", "qs-dkd", "qs-kd-cached", "qs-resume", "wad"):
        assert (tmp_path / "runs" / run / "result.json").is_file(), run
    assert (tmp_path / "results/experiments/quickstart_kd.json").is_file()
