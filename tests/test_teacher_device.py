"""`teacher.device`: a frozen teacher on a device of its own; one-line errors for devices this machine lacks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdforge.cli import main
from kdforge.config import load_config
from kdforge.errors import ConfigError, KdforgeError
from kdforge.train.build import load_data
from kdforge.train.checkpoint import load_tensors
from kdforge.train.trainer import Trainer, resolve_device

DATA = "data.args={num_train: 32, num_test: 16, num_classes: 4, num_superclasses: 2, image_size: 8, cache: false}"
KD = [DATA, "data.batch_size=16", "trainer.progress=false", "trainer.tensorboard=false", "trainer.threads=1",
      "student.name=convnet", "student.args={width: 4}", "teacher.name=convnet", "teacher.args={width: 8}",
      "terms=[{loss: ce, teacher: null, group: task}, {loss: kd}, "
      "{loss: fitnet, student: feat2, teacher: feat2, connector: conv1x1, weight: 0.1}]",
      "trainer.epochs=1", "schedule.name=constant"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data = load_data(load_config(None, KD).data, 0)
    teacher = tmp_path_factory.mktemp("teacher")
    plain = [k for k in KD if not k.startswith(("terms", "teacher", "student.args"))]
    Trainer(load_config(None, [*plain, "student.args={width: 8}"]), teacher, data=data, quiet=True).fit()
    return data, f"teacher.checkpoint={teacher}"


def test_teacher_on_its_own_device_trains_the_same_weights(tmp_path: Path, setup) -> None:
    data, ckpt = setup
    Trainer(load_config(None, [*KD, ckpt]), tmp_path / "same", data=data, quiet=True).fit()
    placed = Trainer(load_config(None, [*KD, ckpt, "teacher.device=cpu"]), tmp_path / "placed", data=data, quiet=True)
    assert placed.module.teacher_devices == {"teacher": torch.device("cpu")}
    assert all(p.device.type == "cpu" for p in placed.module.teachers["teacher"].parameters())
    placed.fit()
    a = load_tensors(tmp_path / "same/checkpoints/last.safetensors")
    b = load_tensors(tmp_path / "placed/checkpoints/last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("name", "message"), [
    ("tpu0", "teacher.device=tpu0 is not a device"),
    ("cuda:7", "teacher.device=cuda:7 but"),
])
def test_a_device_this_machine_lacks_is_one_line(name: str, message: str) -> None:
    if name.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.fail("this check assumes fewer than 8 CUDA devices")
    with pytest.raises(KdforgeError) as err:
        resolve_device(name, "teacher.device")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_student_device_is_rejected_and_the_cli_exits_in_one_line(tmp_path: Path, capsys, setup) -> None:
    with pytest.raises(ConfigError, match="student.device: the student runs on trainer.device"):
        load_config(None, [*KD, "student.device=cpu"])
    recipe = tmp_path / "kd.yaml"
    recipe.write_text("trainer: {epochs: 1}\n")
    code = main(["train", str(recipe), *KD, setup[1], "teacher.device=bogus:3", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "teacher.device=bogus:3 is not a device" in err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()
