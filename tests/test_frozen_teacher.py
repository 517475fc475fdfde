"""The frozen teacher graph (trainer.teacher_freeze): same outputs and taps as eager, rebuilt when the
weights change, eager kept (with one line) where a graph would be wrong, same training as eager."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from kdforge.config import load_config
from kdforge.distill.distiller import Distiller
from kdforge.distill.frozen_teacher import PROBATION, FrozenTeacher, freeze_plan
from kdforge.distill.terms import Term
from kdforge.errors import ConfigError, KdforgeError
from kdforge.models import create_model
from kdforge.models.taps import FeatureTap
from kdforge.train.checkpoint import load_tensors
from kdforge.train.trainer import Trainer

TAPS = ["feat1", "preact2", "pool"]       # a block output, a pre-activation (:input) and the pooled vector

DATA = "data.args={num_train: 64, num_test: 32, num_classes: 10, num_superclasses: 2, image_size: 16, cache: false}"
KD = [DATA, "data.batch_size=16", "trainer.progress=false", "trainer.tensorboard=false", "optim.lr=0.05",
      "student.name=convnet", "student.args={width: 8}", "teacher.name=resnet8", "trainer.epochs=1",
      "terms=[{loss: ce, teacher: null, group: task, weight: 0.5}, {loss: kd, weight: 1.0},"
      " {loss: fitnet, student: feat2, teacher: feat2, connector: conv1x1, weight: 0.1}]", "trainer.threads=1"]


def _teacher(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model("resnet8", num_classes=10).eval()
    with torch.no_grad():                   # trained-looking BN statistics, so folding them matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


class _Counter:
    """Counts the teacher's eager forwards (a forward hook, which a frozen graph never calls)."""

    def __init__(self, model: nn.Module) -> None:
        self.calls = 0
        model.register_forward_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.calls += 1


def _eager(model: nn.Module, tap: FeatureTap, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    tap.clear()
    with torch.no_grad():
        out = model(x)
    feats = dict(tap.features)
    tap.clear()
    return out, feats


def test_graph_matches_eager_outputs_and_taps_without_running_the_eager_forward() -> None:
    model = _teacher()
    tap = FeatureTap(model, TAPS, detach=True)
    frozen, counter = FrozenTeacher(model, tap, "t"), _Counter(model)
    x, y = torch.randn(8, 3, 32, 32), torch.randn(5, 3, 32, 32)
    ref_x, ref_y = _eager(model, tap, x), _eager(model, tap, y)
    counter.calls = 0
    with torch.no_grad():
        frozen(x)                                    # build: traces, checks against eager
        built = counter.calls
        for images, (ref_out, ref_feats) in ((x, ref_x), (y, ref_y), (x, ref_x)):
            out, feats = frozen(images)
            torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
            assert feats.keys() == ref_feats.keys()
            for name in TAPS:
                torch.testing.assert_close(feats[name], ref_feats[name], atol=1e-4, rtol=1e-4)
    assert built > 0 and counter.calls == 2 * built   # only the second shape's build ran eager again
    assert len(frozen._graphs) == 2 and frozen.failed is None


def test_a_weight_change_in_place_rebuilds_the_graph() -> None:
    model = _teacher()
    tap = FeatureTap(model, TAPS, detach=True)
    frozen, x = FrozenTeacher(model, tap, "t"), torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before, _ = frozen(x)
        model.load_state_dict(_teacher(seed=1).state_dict())      # e.g. a checkpoint loaded later
        after, feats = frozen(x)
    ref_out, ref_feats = _eager(model, tap, x)
    torch.testing.assert_close(after, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(feats["pool"], ref_feats["pool"], atol=1e-4, rtol=1e-4)
    assert (after - before).abs().max() > 1e-2
    lines = []
    frozen.log = lines.append
    with torch.no_grad():
        for _ in range(3):                        # a teacher written every step: eager after a few rebuilds
            model.fc.bias.add_(0.1)
            out = frozen(x)
    assert out is None and len(lines) == 1 and "changed in place 4 times" in lines[0]


class _Branchy(nn.Module):
    """Takes a Python branch on the data's value: a trace records one branch only."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        return self.fc(x * 2 if x.mean() > 0 else -x)


class _Untraceable(nn.Module):
    """Returns a dict holding a string: no graph can output that."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 3)

    def forward(self, x: Tensor) -> dict:
        return {"logits": self.fc(x.flatten(1)), "kind": "label"}


def test_data_dependent_branches_are_caught_on_probation_and_fall_back_with_one_line() -> None:
    model, lines = _Branchy().eval(), []
    frozen = FrozenTeacher(model, FeatureTap(model, []), "branchy", log=lines.append)
    positive, negative = torch.rand(4, 3, 2, 2) + 0.1, -torch.rand(4, 3, 2, 2) - 0.1
    with torch.no_grad():
        assert frozen(positive) is not None            # traced on the positive branch, checks out
        assert frozen._graphs[next(iter(frozen._graphs))][1] == PROBATION
        assert frozen(negative) is None                # the other branch: the graph is wrong, caught
        assert frozen(positive) is None                # eager from now on
    assert frozen.failed and len(lines) == 1 and "branchy" in lines[0] and "disagrees" in lines[0]


def test_an_untraceable_teacher_keeps_eager_with_one_line() -> None:
    model, lines = _Untraceable().eval(), []
    frozen = FrozenTeacher(model, FeatureTap(model, []), "odd", log=lines.append)
    with torch.no_grad():
        assert frozen(torch.randn(2, 3, 2, 2)) is None
        assert frozen(torch.randn(2, 3, 2, 2)) is None
    assert len(lines) == 1 and "does not trace" in lines[0]


class _Broken(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        raise ValueError("the teacher's own bug")


def test_the_teachers_own_errors_are_raised_not_taken_for_a_tracing_failure() -> None:
    model, lines = _Broken(), []
    frozen = FrozenTeacher(model, FeatureTap(model, []), "broken", log=lines.append)
    with pytest.raises(ValueError, match="own bug"), torch.no_grad():
        frozen(torch.randn(2, 3))
    assert lines == [] and frozen.failed is None


def test_distiller_serves_frozen_outputs_only_after_setup_and_equal_to_eager() -> None:
    student, teacher = create_model("resnet8", num_classes=10), _teacher()
    terms = [Term("kd", weight=1.0), Term("fitnet", weight=0.1, student="feat1", teacher="feat1",
                                         connector="conv1x1")]
    eager = Distiller(student, teacher, terms)
    x = torch.randn(6, 3, 32, 32)
    eager.setup(x, 64)
    reference = eager.teacher_outputs(x)["teacher"]
    eager.set_teacher_execution(freeze=True)
    counter = _Counter(teacher)
    fast = eager.teacher_outputs(x)["teacher"]
    calls = counter.calls
    fast = eager.teacher_outputs(x)["teacher"]
    assert counter.calls == calls                  # served by the graph
    assert fast.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(fast[key], reference[key], atol=1e-4, rtol=1e-4)
    with pytest.raises(KdforgeError, match="float32"):
        eager.set_teacher_execution(torch.bfloat16, freeze=True)


class _FollowsTheStudent(Distiller):
    """Overrides the step (like EMA teachers and mutual learning): its teacher may change."""

    def forward(self, batch):
        return super().forward(batch)


def test_freeze_plan_modes() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    kd = Distiller(nn.Linear(2, 2), nn.Linear(2, 2), [Term("kd", weight=1.0)])
    assert freeze_plan("auto", cpu, None, kd) and not freeze_plan("auto", cuda, None, kd)
    assert freeze_plan("on", cuda, None, kd) and freeze_plan(True, cpu, None, kd)
    assert not freeze_plan("off", cpu, None, kd) and not freeze_plan(False, cpu, None, kd)
    assert not freeze_plan("auto", cpu, torch.bfloat16, kd)
    assert not freeze_plan("auto", cpu, None, Distiller(nn.Linear(2, 2), None, [Term("ce", teacher=None)]))
    with pytest.raises(ConfigError, match="bf16"):
        freeze_plan("on", cpu, torch.bfloat16, kd)
    mutual = _FollowsTheStudent(nn.Linear(2, 2), nn.Linear(2, 2), [Term("kd", weight=1.0)])
    assert not mutual.teacher_outputs_ahead
    assert not freeze_plan("auto", cpu, None, mutual)
    with pytest.raises(ConfigError, match="follows the student"):
        freeze_plan("on", cpu, None, mutual)
    with pytest.raises(ConfigError, match="teacher_freeze must be one of"):
        freeze_plan("fast", cpu, None, kd)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("teacher")
    plain = [k for k in KD if not k.startswith(("terms", "teacher"))]
    Trainer(load_config(None, [*plain, "student.name=resnet8", "student.args={}"]), path, quiet=True).fit()
    return f"teacher.checkpoint={path}"


def test_training_with_the_frozen_teacher_follows_eager_training(tmp_path: Path, teacher_run: str) -> None:
    runs = {}
    for mode in ("off", "auto"):
        trainer = Trainer(load_config(None, [*KD, teacher_run, f"trainer.teacher_freeze={mode}"]),
                          tmp_path / mode, quiet=True)
        runs[mode] = trainer
        trainer.fit()
    assert runs["off"].module.frozen_teachers == {}
    frozen = runs["auto"].module.frozen_teachers["teacher"]         # auto on CPU: frozen, and it was used
    assert frozen.failed is None and frozen._graphs
    w_off = load_tensors(tmp_path / "off/checkpoints/last.safetensors")
    w_on = load_tensors(tmp_path / "auto/checkpoints/last.safetensors")
    assert w_off.keys() == w_on.keys()
    for key in w_off:                     # float32 in another order: the same training to rounding
        torch.testing.assert_close(w_on[key], w_off[key], atol=1e-4, rtol=1e-3)
    with pytest.raises(ConfigError, match="teacher_freeze must be one of"):
        Trainer(load_config(None, [*KD, teacher_run, "trainer.teacher_freeze=fast"]), tmp_path / "bad", quiet=True)


DDP_RECIPE = """
data:
  args: {num_train: 64, num_test: 32, num_classes: 10, num_superclasses: 2, image_size: 8, cache: false}
  batch_size: 16
student: {name: convnet, args: {width: 4, norm: group}}   # per-sample norm: DDP = one process
optim: {lr: 0.05}
trainer: {epochs: 2, progress: false, tensorboard: false, threads: 1}
"""


def test_a_frozen_batch_norm_teacher_under_ddp_trains_as_one_process(tmp_path: Path) -> None:
    """Two ranks, each with its own frozen graph of a BN teacher, give the one-process weights."""
    import os
    import subprocess
    import sys

    def cli(args: list[str], procs: int = 1) -> subprocess.CompletedProcess:
        launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs > 1 else []
        return subprocess.run([sys.executable, *launch, "-m", "kdforge.cli", *args], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)

    (tmp_path / "teacher.yaml").write_text(DDP_RECIPE)
    teacher = cli(["train", str(tmp_path / "teacher.yaml"), "student.args={width: 4}", "--out", str(tmp_path / "t")])
    assert teacher.returncode == 0, teacher.stderr[-2000:]          # the teacher keeps batch norm
    (tmp_path / "kd.yaml").write_text(DDP_RECIPE + f"teacher: {{name: convnet, args: {{width: 4}}, checkpoint: "
                                      f"{tmp_path / 't'}}}\nterms: [{{loss: ce, teacher: null, group: task, "
                                      "weight: 0.5}, {loss: kd}]\n")
    one = cli(["train", str(tmp_path / "kd.yaml"), "--out", str(tmp_path / "one")])
    two = cli(["train", str(tmp_path / "kd.yaml"), "--out", str(tmp_path / "two")], procs=2)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-2000:]
    assert "freeze off" not in one.stdout + two.stdout, two.stdout[-2000:]
    w1 = load_tensors(tmp_path / "one/checkpoints/last.safetensors")
    w2 = load_tensors(tmp_path / "two/checkpoints/last.safetensors")
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], atol=1e-5, rtol=1e-4)
