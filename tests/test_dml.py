"""DML (deep mutual learning, the ORC card's third arm): the loss by hand, the gradients of every
network of the cohort, a learning or frozen pivot, and a Trainer run that resumes exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.distill.distiller import Batch
from kdforge.errors import KdforgeError
from kdforge.methods.dml import DML, mutual_loss
from kdforge.registry import METHODS


def _kd(a: Tensor, t: Tensor, temp: float) -> Tensor:
    return F.kl_div(F.log_softmax(a / temp, 1), F.softmax(t / temp, 1), reduction="batchmean") * temp**2


def test_mutual_loss_is_ce_plus_mean_kd_to_the_others() -> None:
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(5, 4, generator=g, requires_grad=True) for _ in range(3)]
    y = torch.tensor([0, 1, 2, 3, 0])
    ce, kd = mutual_loss(logits, 1, y, 2.0, 0.3, 0.7)
    assert ce.item() == pytest.approx(0.3 * F.cross_entropy(logits[1], y).item(), rel=1e-6)
    hand = (_kd(logits[1], logits[0], 2.0) + _kd(logits[1], logits[2], 2.0)) / 2
    assert kd.item() == pytest.approx(0.7 * hand.item(), rel=1e-5)
    (ce + kd).backward()
    assert logits[0].grad is None and logits[2].grad is None     # the peers' logits are targets only


def _nets(n: int) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Linear(4, 3) for _ in range(n)]


@pytest.mark.parametrize("pivot_learns", [True, False])
def test_forward_losses_gradients_and_pivot(pivot_learns: bool) -> None:
    studs, pivot = _nets(2), nn.Linear(4, 3)
    dml = DML(studs, pivot, temperature=2.0, ce_weight=0.4, kd_weight=0.6, pivot_learns=pivot_learns, momentum=0.5)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    dml.setup(x, 6)
    dml.train()
    step = dml(Batch(images=x, target=y, index=torch.arange(6)))
    with torch.no_grad():
        z = [s(x) for s in studs] + [pivot(x)]

    def loss_of(i: int, zi: Tensor) -> Tensor:
        others = [z[j] for j in range(3) if j != i]
        return 0.4 * F.cross_entropy(zi, y) + 0.6 * sum(_kd(zi, t, 2.0) for t in others) / 2

    assert step.losses["dml_ce"].item() + step.losses["dml_kd"].item() == pytest.approx(
        float(loss_of(0, z[0]) + loss_of(1, z[1])), rel=1e-5)
    assert ("dml_pivot_ce" in step.losses) == pivot_learns
    step.total().backward()
    for i, net in enumerate(studs + ([pivot] if pivot_learns else [])):
        w = net.weight.detach().clone().requires_grad_(True)
        g, = torch.autograd.grad(loss_of(i, F.linear(x, w, net.bias.detach())), w)
        torch.testing.assert_close(net.weight.grad, g)
    trainable = {id(p) for p in dml.trainable_parameters()}
    assert all((id(p) in trainable) == pivot_learns for p in pivot.parameters())
    if not pivot_learns:
        assert pivot.weight.grad is None
    ce = [F.cross_entropy(zi, y).item() for zi in z[:2]]
    low = min(range(2), key=lambda i: (ce[i], i))
    assert dml.lowest_rate.tolist() == [0.5 if i == low else 0.0 for i in range(2)]
    assert dml.eval_model() is studs[low]


def test_invalid_configurations() -> None:
    with pytest.raises(KdforgeError, match="at least 2"):
        DML(_nets(1))
    assert DML(_nets(1), nn.Linear(4, 3)).pivot is not None      # one student + a pivot is a cohort of two
    with pytest.raises(KdforgeError, match="eval_student"):
        DML(_nets(2), eval_student=4)
    with pytest.raises(KdforgeError, match="label space"):
        DML(_nets(2), nn.Linear(4, 5)).setup(torch.randn(2, 4), 2)


def test_trainer_run_learns_pivot_and_resumes_exactly(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from kdforge.config import load_config
    from kdforge.train.trainer import Trainer

    assert METHODS.get("dml") is DML
    torch.manual_seed(3)
    pivot_w = {"layers.0.linear.weight": torch.randn(24, 192) * 0.2, "layers.0.linear.bias": torch.zeros(24),
               "fc.weight": torch.randn(10, 24) * 0.5, "fc.bias": torch.zeros(10)}
    save_file(pivot_w, str(tmp_path / "pivot.safetensors"))
    base = {
        "data": {"name": "procedural_cifar", "batch_size": 16,
                 "args": {"num_train": 48, "num_test": 16, "num_classes": 10, "num_superclasses": 2,
                          "image_size": 8, "cache": False},
                 "augment": {"crop_padding": 0, "flip": False}},
        "student": {"name": "mlp", "args": {"input_size": 8, "hidden": [16]}},
        "teacher": {"name": "mlp", "args": {"input_size": 8, "hidden": [24]},
                    "checkpoint": str(tmp_path / "pivot.safetensors")},
        "method": {"name": "dml", "args": {"num_students": 3, "temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}},
        "optim": {"name": "sgd", "lr": 0.5, "momentum": 0.9, "weight_decay": 0.0},
        "schedule": {"name": "constant"},
        "trainer": {"epochs": 2, "seed": 1, "device": "cpu", "progress": False, "tensorboard": False},
    }
    trainer = Trainer(load_config(base=base), tmp_path / "run", quiet=True)
    dml = trainer.distiller
    assert isinstance(dml, DML) and len(dml.students) == 3
    trainer.fit()
    assert not torch.equal(dml.pivot.state_dict()["fc.weight"], pivot_w["fc.weight"])   # the pivot learned
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "last.safetensors"))
    assert {k.split(".")[0] for k in saved} == {"student", "peers", "pivot_net", "lowest_rate"}

    stop = {**base, "trainer": {**base["trainer"], "stop_after_steps": 4}}
    Trainer(load_config(base=stop), tmp_path / "run2", quiet=True).fit()
    resumed = Trainer(load_config(base=base), tmp_path / "run2", resume=True, quiet=True)
    resumed.fit()
    for a, b in zip([*resumed.distiller.students, resumed.distiller.pivot], [*dml.students, dml.pivot]):
        for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(v, w, rtol=0, atol=0, msg=lambda m, k=k: f"resumed {k}: {m}")

    with pytest.raises(KdforgeError, match="own losses"):
        Trainer(load_config(base={**base, "terms": [{"loss": "kd"}]}), tmp_path / "run3", quiet=True)
