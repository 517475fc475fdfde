"""The pipelined online teacher: same losses and weights as the sequential step, exact resume, fallbacks."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from kdforge.config import load_config
from kdforge.distill.distiller import Distiller
from kdforge.errors import ConfigError, KdforgeError
from kdforge.methods.dml import DML
from kdforge.methods.ferkd import FerKD
from kdforge.methods.mdcs import MDCS
from kdforge.methods.orc import ORC
from kdforge.train.build import load_data
from kdforge.train.checkpoint import load_tensors
from kdforge.train.teacher_pipeline import pipeline_plan
from kdforge.train.trainer import Trainer

DATA = "data.args={num_train: 96, num_test: 48, num_classes: 10, num_superclasses: 2, image_size: 16, cache: false}"
KD = [DATA, "data.batch_size=16", "trainer.progress=false", "trainer.tensorboard=false", "schedule.name=cosine",
      "optim.lr=0.05", "student.name=convnet", "student.args={width: 8}", "teacher.name=convnet",
      "teacher.args={width: 16}", "data.augment={crop_padding: 2, flip: true, mixup: 0.2}",
      "terms=[{loss: ce, teacher: null, group: task, weight: 0.5}, {loss: kd, weight: 1.0},"
      " {loss: fitnet, student: feat2, teacher: feat2, connector: conv1x1, weight: 0.1}]",
      "trainer.epochs=2", "trainer.threads=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The data and a trained teacher (its checkpoint) every run here shares."""
    data = load_data(load_config(None, KD).data, 0)
    teacher = tmp_path_factory.mktemp("teacher")
    plain = [k for k in KD if not k.startswith(("terms", "teacher"))]
    Trainer(load_config(None, [*plain, "student.args={width: 16}", "trainer.epochs=1"]), teacher, data=data,
            quiet=True).fit()
    return data, f"teacher.checkpoint={teacher}"


def _trainer(path: Path, data, *extra: str, resume: bool = False) -> Trainer:
    images, teacher = data
    return Trainer(load_config(None, [*KD, teacher, *extra]), path, data=images, quiet=True, resume=resume)


def _run(path: Path, data, *extra: str, resume: bool = False) -> Trainer:
    trainer = _trainer(path, data, *extra, resume=resume)
    trainer.fit()
    return trainer


def _rows(path: Path) -> list[dict[str, str]]:
    drop = {"epoch_time_s", "wall_time_s", "cpu_time_s", "lr"}
    return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader((path / "metrics.csv").open())]


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_tensors(a / "checkpoints/last.safetensors"), load_tensors(b / "checkpoints/last.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_pipelined_training_equals_sequential_and_runs_the_teacher_in_the_worker(tmp_path: Path, data) -> None:
    _run(tmp_path / "seq", data, "trainer.teacher_pipeline=off")
    threads: list[str] = []
    original = Distiller.teacher_outputs

    def spy(self, images):
        threads.append(threading.current_thread().name)
        return original(self, images)

    Distiller.teacher_outputs = spy
    try:
        trainer = _run(tmp_path / "pipe", data, "trainer.teacher_pipeline=on")
    finally:
        Distiller.teacher_outputs = original
    assert trainer.pipeline is not None
    assert len(threads) == 12 and all(t.startswith("kdforge-teacher") for t in threads)   # 2 epochs x 6 steps
    _same_weights(tmp_path / "seq", tmp_path / "pipe")
    assert _rows(tmp_path / "seq") == _rows(tmp_path / "pipe")


def test_pipelined_resume_mid_epoch_is_exact(tmp_path: Path, data) -> None:
    _run(tmp_path / "full", data, "trainer.teacher_pipeline=on")
    _run(tmp_path / "cut", data, "trainer.teacher_pipeline=on", "trainer.stop_after_steps=8")
    _run(tmp_path / "cut", data, "trainer.teacher_pipeline=on", "trainer.stop_after_steps=null", resume=True)
    _same_weights(tmp_path / "full", tmp_path / "cut")
    assert _rows(tmp_path / "full") == _rows(tmp_path / "cut")


class _EMATeacher(Distiller):
    """A teacher that follows the student after each step: its outputs cannot be computed ahead."""

    def after_optimizer_step(self, step: int) -> None:
        pass


def test_student_dependent_teachers_keep_the_sequential_path() -> None:
    assert Distiller.teacher_outputs_ahead
    for method in (DML, ORC, FerKD, MDCS, _EMATeacher):
        assert not method.teacher_outputs_ahead, method
    module = _EMATeacher(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), [])
    cpu = torch.device("cpu")
    assert pipeline_plan(module, None, "auto", cpu, 2, None) == (False, None, None)    # CPU: never under auto
    on, line, _ = pipeline_plan(module, None, "auto", torch.device("cuda"), 2, None)
    assert not on and line.startswith("teacher pipeline off: _EMATeacher runs its teacher itself")
    with pytest.raises(ConfigError, match="teacher_pipeline=on: _EMATeacher runs its teacher itself"):
        pipeline_plan(module, None, "on", cpu, 2, None)


def test_the_plan_overlaps_only_where_it_can_and_rejects_bad_settings(tmp_path: Path, data) -> None:
    module = _trainer(tmp_path / "r", data, "trainer.teacher_pipeline=off").module
    cpu = torch.device("cpu")
    assert pipeline_plan(module, None, "auto", cpu, 2, None)[0] is False      # CPU: measured slower (step_time)
    assert pipeline_plan(module, None, "auto", torch.device("cuda"), 2, None) == (True, None, None)   # a stream
    assert pipeline_plan(module, None, "on", cpu, 2, None) == (True, None, 1)
    assert pipeline_plan(module, None, "on", cpu, 8, None) == (True, None, 4)
    assert pipeline_plan(module, None, "on", cpu, 4, 1) == (True, None, 1)
    assert pipeline_plan(module, None, "on", cpu, 1, None) == (True, None, 1)
    assert pipeline_plan(module, None, "off", cpu, 2, None)[0] is False

    class Cached:
        cache = object()
    assert pipeline_plan(module, Cached(), "on", cpu, 2, None)[0] is False     # the cache serves the outputs
    no_teacher = Distiller(torch.nn.Linear(2, 2), None, [])
    assert pipeline_plan(no_teacher, None, "on", cpu, 2, None)[0] is False
    with pytest.raises(ConfigError, match="teacher_pipeline must be one of auto, on, off"):
        pipeline_plan(module, None, "always", cpu, 2, None)
    with pytest.raises(ConfigError, match="teacher_threads must be >= 1"):
        pipeline_plan(module, None, "auto", cpu, 2, 0)


DDP_RECIPE = """
data:
  args: {num_train: 64, num_test: 40, num_classes: 10, num_superclasses: 2, image_size: 8, cache: false}
  batch_size: 16
student: {name: mlp, args: {in_features: 192, hidden: [32]}}
optim: {lr: 0.1}
schedule: {name: cosine}
trainer: {epochs: 2, progress: false, tensorboard: false, threads: 1, teacher_pipeline: %s}
"""


def _cli(args: list[str], procs: int = 1) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kdforge.cli", *args]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
               "-m", "kdforge.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)


def test_pipelined_ddp_matches_one_process(tmp_path: Path) -> None:
    (tmp_path / "teacher.yaml").write_text(DDP_RECIPE % "off")
    assert _cli(["train", str(tmp_path / "teacher.yaml"), "--out", str(tmp_path / "t")]).returncode == 0
    kd = (DDP_RECIPE % "on") + (f"teacher: {{name: mlp, args: {{in_features: 192, hidden: [32]}}, "
                                f"checkpoint: {tmp_path / 't'}}}\n"
                                "terms: [{loss: ce, teacher: null, group: task, weight: 0.5}, {loss: kd}]\n")
    (tmp_path / "kd.yaml").write_text(kd)
    one = _cli(["train", str(tmp_path / "kd.yaml"), "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-2000:]
    two = _cli(["train", str(tmp_path / "kd.yaml"), "--out", str(tmp_path / "two")], procs=2)
    assert two.returncode == 0, two.stderr[-2000:]
    w1 = load_tensors(tmp_path / "one/checkpoints/last.safetensors")
    w2 = load_tensors(tmp_path / "two/checkpoints/last.safetensors")
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], atol=1e-5, rtol=1e-4)


def test_teacher_precision_and_memory_format(tmp_path: Path, data) -> None:
    module = _trainer(tmp_path / "fp32", data, "trainer.teacher_pipeline=off").module
    images = torch.randn(4, 3, 16, 16)
    reference = module.teacher_outputs(images)["teacher"]
    module.set_teacher_execution(torch.bfloat16, channels_last=True)
    fast = module.teacher_outputs(images)["teacher"]
    assert fast.keys() == reference.keys() and all(v.dtype == torch.float32 for v in fast.values())
    for key in reference:                   # bf16 rounding only
        torch.testing.assert_close(fast[key], reference[key], atol=0.05, rtol=0.05)
    assert any(not torch.equal(fast[k], reference[k]) for k in reference)
    with pytest.raises(KdforgeError, match="teacher_precision must be fp32 or bf16"):
        _trainer(tmp_path / "bad", data, "trainer.teacher_precision=fp8")


def test_a_bf16_channels_last_teacher_pipelines_exactly(tmp_path: Path, data) -> None:
    fast = ["trainer.teacher_precision=bf16", "trainer.teacher_channels_last=true", "trainer.epochs=1"]
    _run(tmp_path / "seq", data, *fast, "trainer.teacher_pipeline=off")
    _run(tmp_path / "pipe", data, *fast, "trainer.teacher_pipeline=on")
    _same_weights(tmp_path / "seq", tmp_path / "pipe")
