"""Ctrl-C, SIGTERM and kill -9 during `kdforge train`: exit codes, one line, and a bit-exact resume.

A real `kdforge train` process is signalled once its first epoch-end checkpoint exists (so the
signal lands mid-run); resuming it must give the weights and metrics rows of an uninterrupted run.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdforge.cli import main
from kdforge.train.checkpoint import load_tensors

LONG = """
data:
  args: {num_train: 64, num_test: 32, num_classes: 10, num_superclasses: 2, image_size: 8, cache: false}
  batch_size: 16
student: {name: mlp, args: {in_features: 192, hidden: [64]}}
optim: {lr: 0.05}
schedule: {name: cosine}
trainer: {epochs: 40, progress: false, tensorboard: false, threads: 1}
"""
L2D = ["data.num_train=64", "data.num_test=32", "data.num_classes=4", "data.image_size=12",
       "teacher.backbone_args={width: 4}", "teacher.dim=8", "teacher.heads=2", "student.backbone_args={width: 4}",
       "student.dim=8", "student.heads=2", "teacher_train.epochs=1", "train.epochs=20", "train.batch_size=16",
       "trainer.progress=false", "trainer.threads=1"]


def _signalled(argv: list[str], watch: Path, sig: int) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-m", "kdforge.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not watch.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before it could be signalled: {proc.communicate()[1][-500:]}"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _same_run(a: Path, b: Path) -> None:
    wa, wb = load_tensors(a / "checkpoints/last.safetensors"), load_tensors(b / "checkpoints/last.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    rows = [[{k: v for k, v in r.items() if k != "epoch_time_s"} for r in csv.DictReader((d / "metrics.csv").open())]
            for d in (a, b)]
    assert rows[0] == rows[1]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_signal_saves_exits_conventionally_and_resumes_exactly(tmp_path: Path, sig: int, code: int) -> None:
    recipe = tmp_path / "long.yaml"
    recipe.write_text(LONG)
    assert main(["train", str(recipe), "--out", str(tmp_path / "whole")]) == 0
    cut = tmp_path / "cut"
    proc = _signalled(["train", str(recipe), "--out", str(cut)], cut / "checkpoints/last.json", sig)
    assert proc.returncode == code, proc.stderr[-800:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--resume" in lines[0] and "Traceback" not in proc.stderr
    assert main(["train", "--resume", str(cut)]) == 0
    _same_run(tmp_path / "whole", cut)


def test_kill_9_of_a_task_recipe_resumes_exactly(tmp_path: Path) -> None:
    recipe = Path(__file__).resolve().parents[1] / "configs/methods/l2d.yaml"
    assert main(["train", str(recipe), *L2D, "--out", str(tmp_path / "whole")]) == 0
    cut = tmp_path / "cut"     # killed in the student stage, after its first epoch-end checkpoint
    proc = _signalled(["train", str(recipe), *L2D, "--out", str(cut)], cut / "checkpoints/last.json", signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert main(["train", "--resume", str(cut)]) == 0
    _same_run(tmp_path / "whole/stages/teacher", cut / "stages/teacher")
    _same_run(tmp_path / "whole", cut)
