"""Trainer: exact resume, frozen teacher, run directory contents, schedules, bad checkpoints."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from kdforge.config import ScheduleConfig, load_config
from kdforge.errors import KdforgeError
from kdforge.train.build import load_data
from kdforge.train.checkpoint import load_tensors
from kdforge.train.optim import lr_factor
from kdforge.train.trainer import Trainer

DATA = "data.args={num_train: 96, num_test: 48, num_classes: 10, num_superclasses: 2, image_size: 16, cache: false}"
COMMON = [DATA, "data.batch_size=16", "trainer.progress=false", "trainer.tensorboard=false",
          "schedule.name=cosine", "schedule.warmup_epochs=0.5", "optim.lr=0.05"]


def _cfg(*extra: str):
    return load_config(None, [*COMMON, *extra])


@pytest.fixture(scope="module")
def data():
    cfg = _cfg()
    return load_data(cfg.data, 0)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, data) -> Path:
    run = tmp_path_factory.mktemp("teacher")
    Trainer(_cfg("student.name=resnet8", "trainer.epochs=1"), run, data=data, quiet=True).fit()
    return run


KD = ["student.name=convnet", "student.args={width: 8}", "teacher.name=resnet8",
      "terms=[{loss: ce, teacher: null, group: task, weight: 0.5}, {loss: kd, weight: 1.0},"
      " {loss: fitnet, student: feat2, teacher: feat2, connector: conv1x1, weight: 0.1}]",
      "trainer.epochs=2", "optim.weight_decay=5e-4"]


def test_resume_is_exact(tmp_path: Path, data, teacher_run: Path) -> None:
    kd = [*KD, f"teacher.checkpoint={teacher_run}"]
    Trainer(_cfg(*kd), tmp_path / "full", data=data, quiet=True).fit()
    # 6 steps per epoch: stop inside the second epoch, then continue from the checkpoint
    Trainer(_cfg(*kd, "trainer.stop_after_steps=8"), tmp_path / "cut", data=data, quiet=True).fit()
    state = json.loads((tmp_path / "cut/checkpoints/last.json").read_text())
    assert (state["epoch"], state["step"], state["step_in_epoch"]) == (1, 8, 2)
    resumed = Trainer(_cfg(*kd, "trainer.stop_after_steps=null"), tmp_path / "cut", resume=True, data=data,
                      quiet=True)
    resumed.fit()
    full = load_tensors(tmp_path / "full/checkpoints/last.safetensors")
    cut = load_tensors(tmp_path / "cut/checkpoints/last.safetensors")
    assert full.keys() == cut.keys() and any(k.startswith("terms.2.connectors") for k in full)
    for key in full:
        assert torch.equal(full[key], cut[key]), key
    rows = list(csv.DictReader((tmp_path / "cut/metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["0", "1"]


def test_teacher_is_unchanged_and_run_dir_is_complete(tmp_path: Path, data, teacher_run: Path) -> None:
    before = load_tensors(teacher_run / "checkpoints/last.safetensors")
    trainer = Trainer(_cfg(*KD, f"teacher.checkpoint={teacher_run}", "trainer.tensorboard=true"),
                      tmp_path / "kd", data=data, quiet=True)
    result = trainer.fit()
    teacher_now = {f"student.{k}": v for k, v in trainer.distiller.teachers["teacher"].state_dict().items()}
    for key, value in before.items():
        assert torch.equal(teacher_now[key], value), key
    run = tmp_path / "kd"
    for name in ("config.yaml", "metrics.csv", "result.json", "checkpoints/last.safetensors",
                 "checkpoints/last.json"):
        assert (run / name).is_file(), name
    assert not (run / "checkpoints/best.safetensors").exists()    # no validation split: nothing selected
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert not list(run.rglob("*.tmp"))
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert {"train_kd", "train_ce", "train_fitnet", "test_top1", "test_top5", "lr"} <= set(rows[0])
    assert 0.0 <= result["test_top1"] <= 100.0 and result["steps"] == 12
    saved = load_config(run / "config.yaml")
    assert saved.terms[2].connector == "conv1x1"


def test_amp_bf16_and_grad_clip_run_on_cpu(tmp_path: Path, data) -> None:
    trainer = Trainer(_cfg("student.name=convnet", "student.args={width: 8}", "trainer.epochs=1",
                           "trainer.amp=bf16", "trainer.grad_clip=1.0", "optim.name=adamw", "optim.lr=1e-3"),
                      tmp_path / "amp", data=data, quiet=True)
    before = [p.detach().clone() for p in trainer.distiller.student.parameters()]
    result = trainer.fit()
    after = list(trainer.distiller.student.parameters())
    assert math.isfinite(result["test_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


def test_lr_schedules_by_hand() -> None:
    multistep = ScheduleConfig(name="multistep", milestones=[2, 3], gamma=0.1)
    assert [lr_factor(multistep, s, 10, 4) for s in (0, 19, 20, 30)] == pytest.approx([1, 1, 0.1, 0.01])
    cosine = ScheduleConfig(name="cosine", warmup_epochs=1)
    assert lr_factor(cosine, 0, 10, 3) == pytest.approx(0.1)          # warm-up: (0+1)/10
    assert lr_factor(cosine, 10, 10, 3) == pytest.approx(1.0)         # start of cosine
    assert lr_factor(cosine, 20, 10, 3) == pytest.approx(0.5)         # halfway through 2 cosine epochs


def test_bad_checkpoints_and_existing_runs(tmp_path: Path, data, teacher_run: Path) -> None:
    with pytest.raises(KdforgeError, match=r"does not fit teacher 'teacher' \(resnet20\): 72 missing keys"):
        Trainer(_cfg(*KD, "teacher.name=resnet20", f"teacher.checkpoint={teacher_run}"), tmp_path / "a",
                data=data, quiet=True)
    with pytest.raises(KdforgeError, match="checkpoint not found"):
        Trainer(_cfg(*KD, f"teacher.checkpoint={tmp_path / 'missing.pth'}"), tmp_path / "b", data=data,
                quiet=True)
    with pytest.raises(KdforgeError, match="teacher 'teacher' .* has no checkpoint"):
        Trainer(_cfg(*KD), tmp_path / "c", data=data, quiet=True)
    with pytest.raises(KdforgeError, match="already holds a run; pass --resume"):
        Trainer(_cfg("student.name=resnet8"), teacher_run, data=data, quiet=True)
    with pytest.raises(KdforgeError, match="no 'last' checkpoint"):
        Trainer(_cfg("student.name=resnet8"), tmp_path / "empty", resume=True, data=data, quiet=True)


def test_training_from_teacher_cache_matches_online_kd(tmp_path: Path, data, teacher_run: Path) -> None:
    from kdforge.cli import main

    kd = [*KD[:3], "terms=[{loss: ce, teacher: null, group: task, weight: 0.5}, {loss: kd, weight: 1.0}]",
          "trainer.epochs=2", f"teacher.checkpoint={teacher_run}"]
    online = Trainer(_cfg(*kd), tmp_path / "online", data=data, quiet=True)
    online.fit()
    cfg_file = tmp_path / "kd.yaml"
    from kdforge.config import dump_config

    cfg_file.write_text(dump_config(_cfg(*kd)))
    assert main(["cache", str(cfg_file), "--out", str(tmp_path / "cache"), "--epochs", "2"]) == 0
    cached = Trainer(_cfg(*kd, f"teacher.cache={tmp_path / 'cache'}"), tmp_path / "cached", data=data, quiet=True)
    calls = []
    cached.distiller.teachers["teacher"].register_forward_hook(lambda *a: calls.append(1))
    cached.fit()
    assert calls == []                                   # the teacher never ran during training
    rows_on = list(csv.DictReader((tmp_path / "online/metrics.csv").open()))
    rows_ca = list(csv.DictReader((tmp_path / "cached/metrics.csv").open()))
    for r_on, r_ca in zip(rows_on, rows_ca):             # fp16 storage: equal up to rounding
        assert float(r_ca["train_kd"]) == pytest.approx(float(r_on["train_kd"]), rel=2e-2, abs=2e-3)
    w_on = load_tensors(tmp_path / "online/checkpoints/last.safetensors")
    w_ca = load_tensors(tmp_path / "cached/checkpoints/last.safetensors")
    for key in w_on:
        torch.testing.assert_close(w_ca[key], w_on[key], atol=5e-3, rtol=5e-2)
    other = teacher_run.parent / "other_teacher"
    Trainer(_cfg("student.name=resnet8", "trainer.epochs=1", "optim.lr=0.2"), other, data=data, quiet=True).fit()
    with pytest.raises(KdforgeError, match="teacher"):
        Trainer(_cfg(*kd[:-1], f"teacher.checkpoint={other}", f"teacher.cache={tmp_path / 'cache'}"),
                tmp_path / "stale", data=data, quiet=True)


def test_teacher_of_another_class_count_is_refused(tmp_path: Path, data) -> None:
    from kdforge.models import create_model
    from kdforge.train.checkpoint import save_tensors

    other = create_model("resnet8", num_classes=7)
    save_tensors(tmp_path / "t7.safetensors", other.state_dict())
    with pytest.raises(KdforgeError, match="predicts 7 classes but teacher 'teacher' \\(resnet8\\) is built for 10"):
        Trainer(_cfg(*KD, f"teacher.checkpoint={tmp_path / 't7.safetensors'}"), tmp_path / "r", data=data, quiet=True)
