"""ORC: the role-change mechanism against hand-computed small cases, and a Trainer run against an
independent re-implementation of the whole ORC step (ranking, error samples, ensemble, losses, the pivot's
refinement, SGD)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.distill.distiller import Batch
from kdforge.errors import KdforgeError
from kdforge.methods.orc import (
    ORC,
    ensemble_target,
    error_mask,
    false_knowledge_rate,
    group_teaching_loss,
    pivot_refine_loss,
    promote,
    refine_loss,
)
from kdforge.registry import METHODS

# ------------------------------------------------------------------ pure functions, hand-worked cases


def test_promote_picks_lowest_losses_with_index_tie_break() -> None:
    losses = torch.tensor([0.5, 0.2, 0.2, 0.9])
    assert promote(losses, 1).tolist() == [False, True, False, False]   # tie 1 vs 2 -> index 1
    assert promote(losses, 2).tolist() == [False, True, True, False]
    assert promote(losses, 3).tolist() == [True, True, True, False]
    assert promote(torch.tensor([float("nan"), 3.0, 1.0]), 2).tolist() == [False, True, True]  # NaN last
    with pytest.raises(KdforgeError):
        promote(losses, 5)
    with pytest.raises(KdforgeError):
        promote(losses.reshape(2, 2), 1)


def test_error_mask_rules() -> None:
    target = torch.tensor([0, 1, 2, 0])
    # net A predicts [0, 2, 2, 1] (wrong on 1, 3); net B predicts [1, 1, 2, 1] (wrong on 0, 3)
    a = torch.tensor([[5.0, 0, 0], [0, 1, 3], [0, 0, 1], [0, 2, 1]])
    b = torch.tensor([[0.0, 1, 0], [0, 4, 1], [1, 0, 2], [1, 3, 0]])
    assert error_mask([a, b], target, "any").tolist() == [True, True, False, True]
    assert error_mask([a, b], target, "all").tolist() == [False, False, False, True]
    assert error_mask([a, b], target, "majority").tolist() == [False, False, False, True]  # 1 of 2 is no majority
    c = torch.tensor([[0.0, 3, 0], [0, 5, 0], [0, 0, 1], [2, 0, 0]])   # wrong on 0 only
    assert error_mask([a, b, c], target, "majority").tolist() == [True, False, False, True]
    assert error_mask([], target).tolist() == [False] * 4
    with pytest.raises(KdforgeError):
        error_mask([a], target, "most")


def test_ensemble_target_is_detached_mean_of_pivot_and_promoted() -> None:
    pivot = torch.tensor([[2.0, 0.0, -1.0]])
    s1 = torch.tensor([[0.0, 2.0, 1.0]], requires_grad=True)
    s2 = torch.tensor([[1.0, 1.0, 3.0]], requires_grad=True)
    out = ensemble_target(pivot, [s1, s2])
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0, 1.0]]))
    assert not out.requires_grad
    torch.testing.assert_close(ensemble_target(pivot, []), pivot)
    assert false_knowledge_rate(torch.tensor([[2.0, 1.0], [0.0, 1.0], [3.0, 0.0]]),
                                torch.tensor([0, 0, 1])).item() == pytest.approx(2 / 3)


def _log_softmax(row: list[float], temp: float = 1.0) -> list[float]:
    m = [v / temp for v in row]
    lse = math.log(sum(math.exp(v) for v in m))
    return [v - lse for v in m]


def _kd_by_hand(s_rows: list[list[float]], t_rows: list[list[float]], temp: float) -> float:
    total = 0.0
    for s, t in zip(s_rows, t_rows):
        ls, lt = _log_softmax(s, temp), _log_softmax(t, temp)
        total += sum(math.exp(b) * (b - a) for a, b in zip(ls, lt))
    return total / len(s_rows) * temp * temp


def test_refine_loss_uses_error_samples_only() -> None:
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.0, 3.0, 0.0], [0.5, 0.5, 2.0]], requires_grad=True)
    pivot = torch.tensor([[2.0, 1.0, 0.0], [9.0, -9.0, 0.0], [0.0, 0.0, 1.0]])
    target = torch.tensor([2, 1, 0])
    mask = torch.tensor([True, False, True])
    temp, wc, wk = 2.0, 0.3, 0.7
    ce, kd = refine_loss(logits, pivot, target, mask, temp, wc, wk)
    rows = [[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]
    ce_hand = -(_log_softmax(rows[0])[2] + _log_softmax(rows[1])[0]) / 2
    kd_hand = _kd_by_hand(rows, [[2.0, 1.0, 0.0], [0.0, 0.0, 1.0]], temp)
    assert ce.item() == pytest.approx(wc * ce_hand, rel=1e-6)
    assert kd.item() == pytest.approx(wk * kd_hand, rel=1e-5)
    (ce + kd).backward()
    assert torch.all(logits.grad[1] == 0)          # the non-error sample teaches nothing
    # No error sample: zeros that still backpropagate (zero gradient), i.e. the refinement is skipped.
    logits.grad = None
    ce0, kd0 = refine_loss(logits, pivot, target, torch.zeros(3, dtype=torch.bool), temp, wc, wk)
    assert ce0.item() == 0.0 and kd0.item() == 0.0
    (ce0 + kd0).backward()
    assert torch.all(logits.grad == 0)


def test_group_teaching_loss_by_hand() -> None:
    logits = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    ens = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    target = torch.tensor([1, 0])
    ce, kd = group_teaching_loss(logits, ens, target, 4.0, 0.1, 0.9)
    ce_hand = -(_log_softmax([1.0, 2.0])[1] + _log_softmax([0.0, -1.0])[0]) / 2
    assert ce.item() == pytest.approx(0.1 * ce_hand, rel=1e-6)
    assert kd.item() == pytest.approx(0.9 * _kd_by_hand([[1.0, 2.0], [0.0, -1.0]], [[0.0, 1.0], [2.0, 2.0]], 4.0),
                                      rel=1e-5)


# ------------------------------------------------------------------ the module: one forward by hand


def _students(n: int = 3) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Linear(4, 3) for _ in range(n)]


@pytest.mark.parametrize("refine_pivot", [True, False])
def test_forward_roles_losses_and_gradients(refine_pivot: bool) -> None:
    studs = _students()
    pivot = nn.Linear(4, 3)
    orc = ORC(studs, pivot, temperature=2.0, ce_weight=0.2, kd_weight=0.8, refine_ce_weight=0.5,
              refine_kd_weight=0.5, refine_pivot=refine_pivot, pivot_ce_weight=0.7, promotion_momentum=0.5)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    orc.setup(x, 8)
    orc.train()
    step = orc(Batch(images=x, target=y, index=torch.arange(8)))

    with torch.no_grad():
        z = [s(x) for s in studs]
        p = pivot(x)
    ce = [F.cross_entropy(zi, y).item() for zi in z]
    best = min(range(3), key=lambda i: (ce[i], i))
    rest = [i for i in range(3) if i != best]
    err = [any(int(z[j][b].argmax()) != int(y[b]) for j in rest) for b in range(8)]
    assert 0 < sum(err) < 8          # some error samples and some correct ones: the mask matters
    ens = (p + z[best]) / 2
    assert step.extras["promoted"].tolist() == [i == best for i in range(3)]
    assert step.extras["error_fraction"].item() == pytest.approx(sum(err) / 8)

    def kd(a: Tensor, t: Tensor) -> Tensor:
        return F.kl_div(F.log_softmax(a / 2, 1), F.softmax(t / 2, 1), reduction="batchmean") * 4

    e = torch.tensor(err)
    exp = {"orc_refine_ce": 0.5 * F.cross_entropy(z[best][e], y[e]), "orc_refine_kd": 0.5 * kd(z[best][e], p[e]),
           "orc_student_ce": sum(0.2 * F.cross_entropy(z[i], y) for i in rest),
           "orc_student_kd": sum(0.8 * kd(z[i], ens) for i in rest)}
    if refine_pivot:
        exp["orc_pivot_ce"] = 0.7 * F.cross_entropy(p[e], y[e])
    assert set(step.losses) == set(exp)
    for name, value in exp.items():
        assert step.losses[name].item() == pytest.approx(float(value), rel=1e-5), name
    assert step.groups["orc_student_ce"] == "task" and step.groups["orc_student_kd"] == "distill"

    # Gradients: the promoted network learns only from its refinement (the ensemble it belongs to is
    # detached); a student-group network only from CE + KD to the ensemble.
    step.total().backward()
    w_best = studs[best].weight.detach().clone().requires_grad_(True)
    zb = F.linear(x, w_best, studs[best].bias.detach())
    g_best, = torch.autograd.grad(0.5 * F.cross_entropy(zb[e], y[e]) + 0.5 * kd(zb[e], p[e]), w_best)
    torch.testing.assert_close(studs[best].weight.grad, g_best)
    j = rest[0]
    w_j = studs[j].weight.detach().clone().requires_grad_(True)
    zj = F.linear(x, w_j, studs[j].bias.detach())
    g_j, = torch.autograd.grad(0.2 * F.cross_entropy(zj, y) + 0.8 * kd(zj, ens), w_j)
    torch.testing.assert_close(studs[j].weight.grad, g_j)
    trainable = {id(q) for q in orc.trainable_parameters()}
    if refine_pivot:
        # The paper's teacher group learns on the student group's error samples: the pivot too
        # (CE on those samples only; the teaching targets are detached, so nothing else reaches it).
        w_p = pivot.weight.detach().clone().requires_grad_(True)
        zp = F.linear(x, w_p, pivot.bias.detach())
        g_p, = torch.autograd.grad(0.7 * F.cross_entropy(zp[e], y[e]), w_p)
        torch.testing.assert_close(pivot.weight.grad, g_p)
        assert all(id(q) in trainable for q in pivot.parameters())
        assert any(k.startswith("pivot_net.") for k in orc.checkpoint_state())   # it changes: saved
    else:
        assert all(p_.grad is None for p_ in pivot.parameters())   # the ablation: a frozen pivot
        assert not any(id(q) in trainable for q in pivot.parameters())
        assert not any("pivot" in k or k.startswith("teachers.") for k in orc.checkpoint_state())

    # Promotion rate (momentum 0.5 from zeros) and the evaluated network follow the promotions.
    assert orc.promotion_rate.tolist() == [0.5 if i == best else 0.0 for i in range(3)]
    assert orc.eval_model() is studs[best]
    assert ORC(_students(), nn.Linear(4, 3), eval_student=2).eval_model() is not None


def test_pivot_refine_loss_and_train_mode() -> None:
    logits = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]], requires_grad=True)
    target = torch.tensor([1, 1, 0])
    loss = pivot_refine_loss(logits, target, torch.tensor([True, False, True]), 0.5)
    hand = -(_log_softmax([1.0, 0.0])[1] + _log_softmax([3.0, 1.0])[0]) / 2
    assert loss.item() == pytest.approx(0.5 * hand, rel=1e-6)
    loss.backward()
    assert torch.all(logits.grad[1] == 0)
    zero = pivot_refine_loss(logits, target, torch.zeros(3, dtype=torch.bool), 0.5)
    assert zero.item() == 0.0 and zero.requires_grad
    # A refined pivot trains like the students (train mode: it diverged with frozen batch-norm at
    # the students' lr); probing shapes in setup moves no batch-norm statistics.
    pivot = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    orc = ORC(_students(2), pivot).train()
    assert orc.pivot is pivot and pivot.training
    x = torch.randn(6, 4)
    before = pivot[1].running_mean.clone()
    orc.setup(x, 6)
    torch.testing.assert_close(pivot[1].running_mean, before, rtol=0, atol=0)
    assert pivot.training
    orc(Batch(images=x, target=torch.zeros(6, dtype=torch.long), index=torch.arange(6)))
    assert not torch.equal(pivot[1].running_mean, before)
    assert not ORC(_students(2), pivot).eval().pivot.training


# ------------------------------------------------------------------ Trainer run vs an independent re-implementation


def _mlp(w: dict[str, Tensor], x: Tensor) -> Tensor:
    h = F.relu(F.linear(x.flatten(1), w["layers.0.linear.weight"], w["layers.0.linear.bias"]))
    return F.linear(h, w["fc.weight"], w["fc.bias"])


def test_trainer_run_matches_reimplementation(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from kdforge.config import load_config
    from kdforge.train.trainer import Trainer, epoch_order

    assert METHODS.get("orc") is ORC
    torch.manual_seed(5)
    pivot_w = {"layers.0.linear.weight": torch.randn(24, 192) * 0.2, "layers.0.linear.bias": torch.zeros(24),
               "fc.weight": torch.randn(10, 24) * 0.5, "fc.bias": torch.zeros(10)}
    save_file(pivot_w, str(tmp_path / "pivot.safetensors"))
    lr, seed, temp = 0.5, 2, 4.0
    base = {
        "data": {"name": "procedural_cifar", "batch_size": 16,
                 "args": {"num_train": 48, "num_test": 16, "num_classes": 10, "num_superclasses": 2,
                          "image_size": 8, "cache": False},
                 "augment": {"crop_padding": 0, "flip": False}},
        "student": {"name": "mlp", "args": {"input_size": 8, "hidden": [16]}},
        "teacher": {"name": "mlp", "args": {"input_size": 8, "hidden": [24]},
                    "checkpoint": str(tmp_path / "pivot.safetensors")},
        "method": {"name": "orc", "args": {"num_students": 3, "temperature": temp}},
        "optim": {"name": "sgd", "lr": lr, "momentum": 0.0, "weight_decay": 0.0},
        "schedule": {"name": "constant"},
        "trainer": {"epochs": 2, "seed": seed, "device": "cpu", "progress": False, "tensorboard": False},
    }
    trainer = Trainer(load_config(base=base), tmp_path / "run", quiet=True)
    orc = trainer.distiller
    assert isinstance(orc, ORC) and len(orc.students) == 3
    assert {id(p) for p in trainer.optimizer.param_groups[0]["params"]} == {
        id(p) for s in [*orc.students, orc.pivot] for p in s.parameters()}
    init = [{k: v.detach().clone() for k, v in s.state_dict().items()} for s in orc.students]
    assert not torch.equal(init[0]["fc.weight"], init[1]["fc.weight"])   # fresh initialisations
    data = trainer.data.train
    trainer.fit()

    # Re-implementation: per step rank by CE, error samples of the others, mean-logit ensemble, SGD.
    mean = torch.tensor(data.mean).reshape(1, -1, 1, 1)
    std = torch.tensor(data.std).reshape(1, -1, 1, 1)
    images = (data.images.float() / 255.0 - mean) / std
    nets = [{k: v.clone().requires_grad_(True) for k, v in w.items()} for w in init]
    piv = {k: v.clone().requires_grad_(True) for k, v in pivot_w.items()}
    rate = [0.0, 0.0, 0.0]

    def kd(a: Tensor, t: Tensor) -> Tensor:
        return F.kl_div(F.log_softmax(a / temp, 1), F.softmax(t / temp, 1), reduction="batchmean") * temp**2

    for epoch in range(2):
        order = epoch_order(len(data), seed, epoch)
        for i in range(3):
            idx = order[i * 16:(i + 1) * 16]
            x, y = images[idx], data.labels[idx]
            z = [_mlp(w, x) for w in nets]
            p = _mlp(piv, x)
            ce = [F.cross_entropy(zi, y).item() for zi in z]
            best = min(range(3), key=lambda n: (ce[n], n))
            rest = [n for n in range(3) if n != best]
            e = torch.tensor([any(int(z[j][b].argmax()) != int(y[b]) for j in rest) for b in range(len(y))])
            ens = ((p + z[best]) / 2).detach()
            loss = {best: 0.1 * F.cross_entropy(z[best][e], y[e]) + 0.9 * kd(z[best][e], p[e].detach())}
            loss.update({n: 0.1 * F.cross_entropy(z[n], y) + 0.9 * kd(z[n], ens) for n in rest})
            loss[3] = F.cross_entropy(p[e], y[e])       # the pivot, refined on the error samples
            for n, w in enumerate([*nets, piv]):
                keys = list(w)
                grads = torch.autograd.grad(loss[n], [w[k] for k in keys])
                with torch.no_grad():
                    for k, g in zip(keys, grads):
                        w[k].sub_(lr * g)
            rate = [0.99 * r + 0.01 * (n == best) for n, r in enumerate(rate)]

    for n, student in enumerate(orc.students):
        for k, v in student.state_dict().items():
            torch.testing.assert_close(v, nets[n][k].detach(), rtol=1e-4, atol=2e-5,
                                       msg=lambda m, n=n, k=k: f"student {n} {k}: {m}")
    for k, v in orc.pivot.state_dict().items():
        torch.testing.assert_close(v, piv[k].detach(), rtol=1e-4, atol=2e-5, msg=lambda m, k=k: f"pivot {k}: {m}")
    assert not torch.equal(orc.pivot.state_dict()["fc.weight"], pivot_w["fc.weight"])   # refined online
    torch.testing.assert_close(orc.promotion_rate, torch.tensor(rate))
    best_rate = max(range(3), key=lambda n: (rate[n], -n))
    assert orc.eval_model() is orc.students[best_rate]

    saved = load_file(str(tmp_path / "run" / "checkpoints" / "last.safetensors"))
    assert {k.split(".")[0] for k in saved} == {"student", "peers", "pivot_net", "promotion_rate"}
    assert any(k.startswith("peers.1.") for k in saved)

    # Interrupted after 4 steps and resumed from the checkpoint: the same students and promotion rate.
    stop = {**base, "trainer": {**base["trainer"], "stop_after_steps": 4}}
    Trainer(load_config(base=stop), tmp_path / "run3", quiet=True).fit()
    resumed = Trainer(load_config(base=base), tmp_path / "run3", resume=True, quiet=True)
    resumed.fit()
    for a, b in zip([*resumed.distiller.students, resumed.distiller.pivot], [*orc.students, orc.pivot]):
        for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(v, w, rtol=0, atol=0, msg=lambda m, k=k: f"resumed {k}: {m}")
    torch.testing.assert_close(resumed.distiller.promotion_rate, orc.promotion_rate, rtol=0, atol=0)

    with pytest.raises(KdforgeError, match="own losses"):
        Trainer(load_config(base={**base, "terms": [{"loss": "kd"}]}), tmp_path / "run2", quiet=True)
    with pytest.raises(KdforgeError, match="stale"):    # a refined pivot's outputs cannot be cached
        Trainer(load_config(base={**base, "teacher": {**base["teacher"], "cache": str(tmp_path / "cache")}}),
                tmp_path / "run4", quiet=True)
