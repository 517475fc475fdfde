"""DDP on CPU: 2 gloo processes under torchrun match 1 process with the same global batch."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import torch

from kdforge.train.checkpoint import load_tensors

# An MLP student and teacher: no batch-coupled layers, so 2 ranks x 8 samples compute the
# same gradient as 1 rank x 16 (up to summation order).
TINY = """
data:
  args: {num_train: 64, num_test: 40, num_classes: 10, num_superclasses: 2, image_size: 8, cache: false}
  batch_size: 16
student: {name: mlp, args: {in_features: 192, hidden: [32]}}
optim: {lr: 0.1}
schedule: {name: cosine}
trainer: {epochs: 2, progress: false, tensorboard: false, threads: 1}
"""


def _train(cfg: Path, out: Path, procs: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kdforge.cli", "train", str(cfg), "--out", str(out)]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
               "-m", "kdforge.cli", "train", str(cfg), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_two_process_gloo_matches_one_process(tmp_path: Path) -> None:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    one = _train(cfg, tmp_path / "one", 1)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _train(cfg, tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count('"test_top1"') == 1            # the result is printed once, by rank 0
    assert "FutureWarning" not in two.stderr
    w1 = load_tensors(tmp_path / "one/checkpoints/last.safetensors")
    w2 = load_tensors(tmp_path / "two/checkpoints/last.safetensors")
    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], atol=1e-5, rtol=1e-4)
    rows1 = list(csv.DictReader((tmp_path / "one/metrics.csv").open()))
    rows2 = list(csv.DictReader((tmp_path / "two/metrics.csv").open()))
    assert len(rows1) == len(rows2) == 2
    for r1, r2 in zip(rows1, rows2):
        assert r1["train_samples"] == r2["train_samples"] == "64"    # ranks split each batch, no repeats
        for key in ("train_loss", "train_top1", "test_top1", "test_top5", "test_loss"):
            assert abs(float(r1[key]) - float(r2[key])) < 1e-3, key
