"""TaskModule: frozen parts stay in eval mode, out of the optimizer and out of checkpoints."""

from __future__ import annotations

from torch import nn

from kdforge.tasks.base import TaskModule


class _Module(TaskModule):
    def __init__(self) -> None:
        super().__init__()
        self.student = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        self.teachers = nn.ModuleDict({"teacher": nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))})
        self.teachers.requires_grad_(False)


class _Snapshot(_Module):
    frozen = ("snapshot",)

    def __init__(self) -> None:
        super().__init__()
        self.snapshot = nn.BatchNorm1d(2)


def test_frozen_parts_stay_in_eval_mode_and_out_of_training_state() -> None:
    m = _Module().train()
    assert m.training and m.student.training and all(not x.training for x in m.teachers.modules())
    assert m.train(False) is m and not m.student.training
    m.train(True)
    assert not m.teachers["teacher"][1].training
    assert {id(p) for p in m.trainable_parameters()} == {id(p) for p in m.student.parameters()}
    assert all(not k.startswith("teachers.") for k in m.checkpoint_state())
    s = _Snapshot().train()
    assert not s.snapshot.training and s.teachers.training      # only the parts named in `frozen`
