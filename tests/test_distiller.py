"""Distiller: frozen teachers, gradients only to student and connectors, cache inputs, bad input."""

from __future__ import annotations

import pytest
import torch

from kdforge.distill.distiller import Batch, Distiller
from kdforge.distill.terms import Term
from kdforge.errors import KdforgeError
from kdforge.losses import fitnet_loss, kd_loss
from kdforge.models import create_model


def _models(classes: int = 10) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    student = create_model("convnet", num_classes=classes, width=8)
    teacher = create_model("resnet8", num_classes=classes)
    return student, teacher


def _batch(n: int = 4, classes: int = 10, epoch: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(1)
    return Batch(images=torch.randn(n, 3, 16, 16, generator=gen), target=torch.randint(0, classes, (n,), generator=gen),
                 index=torch.arange(n), epoch=epoch)


def _distiller(**kd_kwargs) -> Distiller:
    student, teacher = _models()
    terms = [Term("ce", teacher=None, group="task"), Term("kd", **kd_kwargs),
             Term("fitnet", student="feat2", teacher="feat2", connector="conv1x1", weight=2.0)]
    d = Distiller(student, teacher, terms)
    d.setup(_batch().images, num_samples=4)
    return d


def test_gradients_reach_only_student_and_connectors() -> None:
    d = _distiller()
    out = d(_batch())
    assert set(out.losses) == {"ce", "kd", "fitnet"}
    assert out.groups == {"ce": "task", "kd": "distill", "fitnet": "distill"}
    out.total().backward()
    teacher_params = list(d.teachers["teacher"].parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher_params)
    assert all(p.grad is not None for p in d.student.parameters())
    connector = d.terms[2].connectors[0]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in connector.parameters())
    trainable = {id(p) for p in d.trainable_parameters()}
    assert not trainable & {id(p) for p in teacher_params}
    assert {id(p) for p in connector.parameters()} <= trainable
    assert not any(k.startswith("teachers.") for k in d.checkpoint_state())


def test_losses_match_hand_computation_and_teacher_stays_in_eval() -> None:
    d = _distiller(weight=0.9, warmup_epochs=4)
    d.train()
    assert not d.teachers["teacher"].training
    batch = _batch(epoch=1)
    out = d(batch)
    d.student.eval()
    with torch.no_grad():
        s_logits = d.student(batch.images)
        t_logits = d.teachers["teacher"](batch.images)
    d.student.train()
    # KD: weight 0.9 times the linear warm-up factor (epoch 1 of 4 -> 2/4)
    assert out.teacher_logits is not None
    expected_kd = 0.9 * 0.5 * kd_loss(out.outputs, t_logits, 4.0)
    torch.testing.assert_close(out.losses["kd"], expected_kd)
    assert not torch.allclose(out.outputs, s_logits)   # train-mode BN differs from eval: we used train mode
    groups = out.by_group()
    torch.testing.assert_close(groups["distill"], out.losses["kd"] + out.losses["fitnet"])
    torch.testing.assert_close(groups["task"], out.losses["ce"])
    torch.testing.assert_close(out.total(), groups["distill"] + groups["task"])


def test_fitnet_reads_connector_projection() -> None:
    d = _distiller()
    batch = _batch()
    out = d(batch)
    feats = d._student_tap.features["feat2"]
    with torch.no_grad():
        _, t_feats = d._run_teacher("teacher", batch.images)
    expected = 2.0 * fitnet_loss(d.terms[2].connectors[0](feats), t_feats["feat2"])
    torch.testing.assert_close(out.losses["fitnet"], expected)


def test_cached_teacher_outputs_replace_the_teacher_forward() -> None:
    student, teacher = _models()
    d = Distiller(student, teacher, [Term("kd")])
    d.setup(_batch().images, 4)
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    batch = _batch()
    cached = torch.randn(4, 10, generator=torch.Generator().manual_seed(5))
    batch.teacher_outputs = {"teacher": {"logits": cached}}
    out = d(batch)
    assert calls == []
    torch.testing.assert_close(out.losses["kd"], kd_loss(out.outputs, cached, 4.0))


def test_bad_input_fails_with_one_line() -> None:
    student, _ = _models(classes=10)
    _, teacher = _models(classes=7)
    d = Distiller(student, teacher, [Term("kd")])
    with pytest.raises(KdforgeError, match="teacher 'teacher' predicts 7 classes but the student predicts 10"):
        d.setup(_batch().images, 4)
    with pytest.raises(KdforgeError, match=r"unknown tap 'feat9'.*close matches"):
        Distiller(student, teacher, [Term("fitnet", student="feat9", teacher="feat2")])
    with pytest.raises(KdforgeError, match="reads teacher 'other'"):
        Distiller(student, teacher, [Term("kd", teacher_id="other")])
    with pytest.raises(KdforgeError, match="unknown loss 'kdd'; close matches: kd"):
        Term("kdd")
    with pytest.raises(KdforgeError, match="repeated: kd"):
        Distiller(student, teacher, [Term("kd"), Term("kd")])
