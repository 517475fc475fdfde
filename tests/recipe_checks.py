"""Checks every task recipe must pass: exact stop-and-resume, and 2-process gloo == 1 process.

Used by the per-method tests (`from recipe_checks import ...`; tests/ is on sys.path).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import torch

from kdforge.train.checkpoint import load_tensors
from kdforge.train.stages import run_recipe

TIMING = {"epoch_time_s", "wall_time_s", "cpu_time_s"}


def _rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as f:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_tensors(run / "checkpoints" / "last.safetensors")


def run_dirs(root: Path) -> list[Path]:
    """The recipe's run directory and its stage directories."""
    stages = sorted((root / "stages").iterdir()) if (root / "stages").is_dir() else []
    return [*stages, root]


def assert_resume_exact(recipe: str | Path | dict, overrides: list[str], tmp_path: Path, stop_after: int) -> dict:
    """Run the recipe whole, then stopped after `stop_after` steps of a stage and resumed: every
    stage's weights, buffers and metrics rows must be bitwise equal. Returns the full run's result."""
    full = run_recipe(recipe, overrides, out=tmp_path / "full")
    cut_dir = tmp_path / "cut"
    stopped = run_recipe(recipe, [*overrides, f"trainer.stop_after_steps={stop_after}"], out=cut_dir)
    assert "stopped_at_step" in stopped, f"the run was not stopped at step {stop_after}: {stopped}"
    resumed = stopped
    for _ in range(10):     # each resume runs on until the run ends (stop_after_steps=null)
        resumed = run_recipe(cut_dir / "config.yaml", ["trainer.stop_after_steps=null"], out=cut_dir, resume=True)
        if "stopped_at_step" not in resumed:
            break
    for a, b in zip(run_dirs(tmp_path / "full"), run_dirs(cut_dir), strict=True):
        wa, wb = _weights(a), _weights(b)
        assert wa.keys() == wb.keys(), a.name
        for k in wa:
            assert torch.equal(wa[k], wb[k]), f"{a.name}: {k} differs after resume"
        assert _rows(a) == _rows(b), f"{a.name}: metrics rows differ after resume"
    strip = {k: v for k, v in full.items() if k not in TIMING}
    assert strip == {k: v for k, v in resumed.items() if k not in TIMING}
    return full


def train_cli(recipe: Path, out: Path, procs: int, overrides: list[str] = ()) -> subprocess.CompletedProcess:
    cmd = ["-m", "kdforge.cli", "train", str(recipe), *overrides, "--out", str(out)]
    if procs > 1:
        cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env, timeout=600)


def assert_ddp_matches(recipe: Path, overrides: list[str], tmp_path: Path, atol: float = 1e-5,
                       metric_tol: float = 1e-3) -> None:
    """`torchrun --nproc_per_node=2` (gloo) gives the 1-process weights and metrics rows of every stage."""
    one = train_cli(recipe, tmp_path / "one", 1, overrides)
    assert one.returncode == 0, one.stderr[-3000:]
    two = train_cli(recipe, tmp_path / "two", 2, overrides)
    assert two.returncode == 0, two.stderr[-3000:]
    for a, b in zip(run_dirs(tmp_path / "one"), run_dirs(tmp_path / "two"), strict=True):
        wa, wb = _weights(a), _weights(b)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=1e-4, msg=f"{a.name}: {k}")
        for ra, rb in zip(_rows(a), _rows(b), strict=True):
            for k, v in ra.items():
                if k.startswith("train_") or k.startswith("val_"):
                    assert abs(float(v) - float(rb[k])) <= metric_tol * max(1.0, abs(float(v))), (a.name, k)
