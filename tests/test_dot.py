"""DOT optimizer: the update rule against an independent re-computation, gradient paths, SGD limit,
param groups + schedulers, state_dict resume and AMP loss scaling."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.methods.dot import DOT, dot_gradients

T = 4.0


class Net(nn.Module):
    """Shared trunk+head (both losses), `aux` head (task only), `connector` (distill only)."""

    def __init__(self, connector: bool = True) -> None:
        super().__init__()
        self.trunk = nn.Linear(6, 12)
        self.head = nn.Linear(12, 4)
        self.aux = nn.Linear(12, 4)
        self.connector = nn.Linear(12, 5) if connector else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        h = torch.tanh(self.trunk(x))
        feat = self.connector(h) if self.connector is not None else None
        return h, self.head(h), self.aux(h), feat


def make_batch(step: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, 6, generator=g)
    y = torch.randint(0, 4, (16,), generator=g)
    t_logits = torch.randn(16, 4, generator=g) * 2
    t_feat = torch.randn(16, 5, generator=g)
    return x, y, t_logits, t_feat


def losses(model: Net, step: int) -> tuple[Tensor, Tensor]:
    """Task = CE (+ aux CE from step 2 on, so `aux` gets its first gradient late); distill = KD + hint."""
    x, y, t_logits, t_feat = make_batch(step)
    _, logits, aux, feat = model(x)
    task = 0.1 * F.cross_entropy(logits, y)
    if step >= 2:
        task = task + 0.5 * F.cross_entropy(aux, y)
    kd = F.kl_div(F.log_softmax(logits / T, 1), F.softmax(t_logits / T, 1), reduction="batchmean") * T * T
    kd = 0.9 * kd
    if feat is not None:
        kd = kd + F.mse_loss(feat, t_feat)
    return task, kd


def make_model(connector: bool = True) -> Net:
    torch.manual_seed(0)
    return Net(connector)


def reference_run(model: Net, steps: int, hp) -> list[dict[str, Tensor]]:
    """The card/official rule written out per parameter; `hp(name, step) -> (lr, beta, delta, wd)`."""
    params = dict(model.named_parameters())
    names = list(params)
    buf_t: dict[str, Tensor] = {}
    buf_k: dict[str, Tensor] = {}
    history = []
    for s in range(steps):
        task, kd = losses(model, s)
        plist = [params[n] for n in names]
        g_kd = torch.autograd.grad(kd, plist, retain_graph=True, allow_unused=True)
        g_task = torch.autograd.grad(task, plist, allow_unused=True)
        with torch.no_grad():
            for n, gt, gk in zip(names, g_task, g_kd):
                p = params[n]
                lr, beta, delta, wd = hp(n, s)
                if gt is not None:
                    d = gt + wd * p
                    if n not in buf_t:
                        buf_t[n] = d.clone()
                    else:
                        m = beta - delta if gk is not None else beta
                        buf_t[n] = m * buf_t[n] + d
                    p.sub_(lr * buf_t[n])
                if gk is not None:
                    if n not in buf_k:
                        buf_k[n] = gk.clone()  # raw distill gradient, no decay (official)
                    elif gt is not None:
                        buf_k[n] = (beta + delta) * buf_k[n] + gk
                    else:
                        buf_k[n] = beta * buf_k[n] + (gk + wd * p)
                    p.sub_(lr * buf_k[n])
        history.append({n: p.detach().clone() for n, p in params.items()})
    return history


def dot_run(model: Net, opt: DOT, steps: int, start: int = 0, sched=None) -> list[dict[str, Tensor]]:
    history = []
    for s in range(start, start + steps):
        task, kd = losses(model, s)
        opt.step_losses(task, kd)
        if sched is not None:
            sched.step()
        history.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return history


def assert_same(a: list[dict[str, Tensor]], b: list[dict[str, Tensor]], **tol) -> None:
    assert len(a) == len(b)
    for s, (x, y) in enumerate(zip(a, b)):
        for n in x:
            torch.testing.assert_close(x[n], y[n], msg=lambda m, n=n, s=s: f"step {s} {n}: {m}", **tol)


def test_trajectory_matches_independent_rule() -> None:
    lr, beta, delta, wd = 0.2, 0.9, 0.075, 5e-3
    ref = reference_run(make_model(), 5, lambda n, s: (lr, beta, delta, wd))
    model = make_model()
    got = dot_run(model, DOT(model.parameters(), lr=lr, momentum=beta, delta=delta, weight_decay=wd), 5)
    assert_same(got, ref)
    # Sanity: the rule is not just SGD on the sum (delta matters), so the test is sensitive.
    m2 = make_model()
    sgd = torch.optim.SGD(m2.parameters(), lr=lr, momentum=beta, weight_decay=wd)
    for s in range(5):
        sgd.zero_grad()
        sum(losses(m2, s)).backward()
        sgd.step()
    assert not torch.allclose(m2.trunk.weight, model.trunk.weight, atol=1e-6)


def test_buffers_follow_one_loss_rule() -> None:
    model = make_model()
    opt = DOT(model.parameters(), lr=0.1)
    dot_run(model, opt, 3)
    st = opt.state
    assert "momentum_buffer" in st[model.trunk.weight] and "momentum_kd_buffer" in st[model.trunk.weight]
    assert "momentum_kd_buffer" not in st[model.aux.weight]  # task only
    assert "momentum_buffer" not in st[model.connector.weight]  # distill only


def test_fast_gradients_equal_two_backward_passes() -> None:
    class ConvNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.b1 = nn.BatchNorm2d(8)
            self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.b2 = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 10)
            self.hint = nn.Conv2d(8, 4, 1)  # distill-only connector

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            h = F.relu(self.b1(self.c1(x)))
            h = F.relu(self.b2(self.c2(h)) + h)
            return self.fc(h.mean((2, 3))), self.hint(h)

    torch.manual_seed(0)
    net = ConvNet().train()
    x, y, t = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,)), torch.randn(8, 10)
    params = list(net.parameters())

    def split(model: nn.Module) -> tuple[Tensor, Tensor]:
        logits, hint = model(x)
        kd = F.kl_div(F.log_softmax(logits / T, 1), F.softmax(t / T, 1), reduction="batchmean")
        return F.cross_entropy(logits, y), kd + hint.square().mean()

    ref_t, ref_k = dot_gradients(*split(net), params, "two_pass")
    got_t, got_k = dot_gradients(*split(net), params, "batched")
    for a, b in zip(ref_t + ref_k, got_t + got_k):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ref_t[-1] is None and ref_k[-1] is not None  # hint reached by the distill loss only
    assert ref_t[0] is not None and ref_k[0] is not None

    # Whole trajectories: batched == two_pass == the reference backward()/step_kd()/step() protocol.
    runs = []
    for mode in ("two_pass", "batched", "protocol"):
        model = make_model()
        grad_mode = "two_pass" if mode == "protocol" else mode
        opt = DOT(model.parameters(), lr=0.2, weight_decay=1e-3, grad_mode=grad_mode)
        if mode != "protocol":
            runs.append(dot_run(model, opt, 4))
            continue
        hist = []
        for s in range(4):
            task, kd = losses(model, s)
            opt.zero_grad(set_to_none=True)
            kd.backward(retain_graph=True)
            opt.step_kd()
            task.backward()
            opt.step()
            hist.append({n: p.detach().clone() for n, p in model.named_parameters()})
        runs.append(hist)
    assert_same(runs[0], runs[2], rtol=0, atol=0)
    assert_same(runs[0], runs[1], rtol=1e-5, atol=1e-6)


def test_batched_falls_back_when_graph_cannot_be_vmapped() -> None:
    class InplaceSq(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x: Tensor) -> Tensor:
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, g: Tensor) -> Tensor:
            (x,) = ctx.saved_tensors
            out = 2 * x
            out.mul_(g)  # in-place on an unbatched tensor: no vmap rule
            return out

    w = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = DOT([w], lr=0.1, grad_mode="batched")
    y = InplaceSq.apply(w)
    with pytest.warns(RuntimeWarning, match="two backward passes"):
        opt.step_losses(y.sum(), (y * y).sum())
    w0 = torch.tensor([1.0, -2.0, 3.0])
    expected = w0 - 0.1 * (2 * w0 + 4 * w0**3)
    torch.testing.assert_close(w.detach(), expected)
    assert opt._batched_failed


def test_delta_zero_is_sgd_on_summed_loss() -> None:
    beta, lr, wd = 0.9, 0.2, 5e-3
    # (a) plain step() on the combined loss's .grad (no step_kd): exactly SGD(momentum=beta).
    m_sgd, m_dot = make_model(), make_model()
    sgd = torch.optim.SGD(m_sgd.parameters(), lr=lr, momentum=beta, weight_decay=wd)
    dot = DOT(m_dot.parameters(), lr=lr, momentum=beta, delta=0.075, weight_decay=wd)
    for s in range(5):
        for m, o in ((m_sgd, sgd), (m_dot, dot)):
            o.zero_grad()
            sum(losses(m, s)).backward()
            o.step()
    for a, b in zip(m_sgd.parameters(), m_dot.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # (b) step_losses on the split losses with delta=0: the two buffers add up to SGD's buffer.
    # (No distill-only params here: their first distill step skips weight decay, as in the official code.)
    m_sgd, m_dot = make_model(connector=False), make_model(connector=False)
    sgd = torch.optim.SGD(m_sgd.parameters(), lr=lr, momentum=beta, weight_decay=wd)
    dot = DOT(m_dot.parameters(), lr=lr, momentum=beta, delta=0.0, weight_decay=wd)
    for s in range(5):
        sgd.zero_grad()
        sum(losses(m_sgd, s)).backward()
        sgd.step()
        dot.step_losses(*losses(m_dot, s))
    for a, b in zip(m_sgd.parameters(), m_dot.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_param_groups_and_scheduler() -> None:
    hp_a = dict(lr=0.3, momentum=0.85, delta=0.05, weight_decay=1e-2)
    hp_b = dict(lr=0.1, momentum=0.9, delta=0.08, weight_decay=0.0)
    milestone, gamma = 2, 0.1

    def hp(name: str, step: int):
        h = hp_a if name.startswith("trunk") else hp_b
        lr = h["lr"] * (gamma if step >= milestone else 1.0)
        return lr, h["momentum"], h["delta"], h["weight_decay"]

    ref = reference_run(make_model(), 5, hp)
    model = make_model()
    trunk = list(model.trunk.parameters())
    rest = [p for n, p in model.named_parameters() if not n.startswith("trunk")]
    opt = DOT([dict(params=trunk, **hp_a), dict(params=rest, lr=hp_b["lr"], delta=hp_b["delta"])], lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[milestone], gamma=gamma)
    got = dot_run(model, opt, 5, sched=sched)
    assert_same(got, ref)


def test_state_dict_round_trip_resumes_identically() -> None:
    model = make_model()
    opt = DOT(model.parameters(), lr=0.2, weight_decay=1e-3)
    dot_run(model, opt, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    cont = dot_run(model, opt, 3, start=3)

    model2 = make_model()
    model2.load_state_dict(saved_model)
    opt2 = DOT(model2.parameters(), lr=0.5)  # hyper-parameters come back from the state dict
    opt2.load_state_dict(saved_opt)
    assert opt2.param_groups[0]["lr"] == 0.2
    resumed = dot_run(model2, opt2, 3, start=3)
    assert_same(cont, resumed, rtol=0, atol=0)


def test_grad_scaler_matches_unscaled_and_skips_non_finite() -> None:
    m_ref, m_amp = make_model(), make_model()
    o_ref = DOT(m_ref.parameters(), lr=0.2, weight_decay=1e-3)
    o_amp = DOT(m_amp.parameters(), lr=0.2, weight_decay=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for s in range(3):
        o_ref.step_losses(*losses(m_ref, s))
        assert o_amp.step_losses(*losses(m_amp, s), grad_scaler=scaler)
        scaler.update()
    for a, b in zip(m_ref.parameters(), m_amp.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert b.grad is None

    before = [p.detach().clone() for p in m_amp.parameters()]
    bufs = {k: v.clone() for k, v in o_amp.state[m_amp.trunk.weight].items()}
    task, kd = losses(m_amp, 3)
    assert not o_amp.step_losses(task, kd * float("nan"), grad_scaler=scaler)
    scaler.update()
    assert scaler.get_scale() == 2.0**11
    for a, b in zip(before, m_amp.parameters()):
        assert torch.equal(a, b)
    for k, v in bufs.items():
        assert torch.equal(v, o_amp.state[m_amp.trunk.weight][k])


def test_invalid_arguments() -> None:
    p = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError):
        DOT(p, lr=0.1, momentum=0.95, delta=0.075)  # beta + delta >= 1
    with pytest.raises(ValueError):
        DOT(p, lr=0.1, momentum=0.05, delta=0.075)  # beta - delta < 0
    with pytest.raises(ValueError):
        DOT(p, lr=0.1, grad_mode="fast")  # type: ignore[arg-type]
    opt = DOT(p, lr=0.1)
    with pytest.raises(ValueError, match="scalar"):
        opt.step_losses(p[0] * 2, p[0].sum())
    with pytest.raises(ValueError, match="neither loss"):
        opt.step_losses(torch.tensor(1.0), torch.tensor(2.0))


# ------------------------------------------------------------------ the Trainer drives DOT (optim.name=dot)


def _mlp_forward(w: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """One-hidden-layer MLP written out (Flatten -> Linear -> ReLU -> fc): (hidden, logits)."""
    h = F.relu(F.linear(x.flatten(1), w["layers.0.linear.weight"], w["layers.0.linear.bias"]))
    return h, F.linear(h, w["fc.weight"], w["fc.bias"])


def test_trainer_with_optim_dot_follows_the_rule(tmp_path) -> None:
    """`kdforge` Trainer with optim.name=dot == the DOT rule re-computed by hand from the same losses.

    Task = 0.1 CE; distill = 0.9 KD (T=4) + FitNet hint through a linear connector, so the student
    is reached by both groups and the connector by the distill group only (the beta rule with
    weight decay on the distill side). The lr drops x0.1 after epoch 0 (multistep schedule).
    """
    from safetensors.torch import load_file, save_file

    from kdforge.config import load_config
    from kdforge.train.trainer import Trainer, epoch_order

    torch.manual_seed(11)
    # A random teacher saved under the state-dict names of kdforge's `mlp` (hidden=[24], input 3x8x8).
    teacher_w = {"layers.0.linear.weight": torch.randn(24, 192) * 0.2,
                 "layers.0.linear.bias": torch.randn(24) * 0.1,
                 "fc.weight": torch.randn(10, 24) * 0.5, "fc.bias": torch.randn(10) * 0.1}
    ckpt = tmp_path / "teacher.safetensors"
    save_file(teacher_w, str(ckpt))
    lr, beta, delta, wd, seed = 0.3, 0.9, 0.075, 1e-2, 3
    cfg = load_config(base={
        "data": {"name": "procedural_cifar", "batch_size": 16, "eval_batch_size": 64,
                 "args": {"num_train": 48, "num_test": 16, "num_classes": 10, "num_superclasses": 2,
                          "image_size": 8, "cache": False},
                 "augment": {"crop_padding": 0, "flip": False}},
        "student": {"name": "mlp", "args": {"input_size": 8, "hidden": [16]}},
        "teacher": {"name": "mlp", "args": {"input_size": 8, "hidden": [24]}, "checkpoint": str(ckpt)},
        "terms": [{"loss": "ce", "teacher": None, "group": "task", "weight": 0.1},
                  {"loss": "kd", "weight": 0.9, "args": {"temperature": T}},
                  {"loss": "fitnet", "student": "feat1", "teacher": "feat1", "connector": "linear"}],
        "optim": {"name": "dot", "lr": lr, "momentum": beta, "delta": delta, "weight_decay": wd},
        "schedule": {"name": "multistep", "milestones": [1], "gamma": 0.1},
        "trainer": {"epochs": 2, "seed": seed, "device": "cpu", "progress": False, "tensorboard": False},
    })
    trainer = Trainer(cfg, tmp_path / "run", quiet=True)
    assert isinstance(trainer.optimizer, DOT)
    init = {k: v.detach().clone() for k, v in trainer.distiller.named_parameters() if v.requires_grad}
    data = trainer.data.train
    trainer.fit()
    got = {k: v.detach() for k, v in trainer.distiller.named_parameters() if v.requires_grad}

    t_w = load_file(str(ckpt))
    mean = torch.tensor(data.mean).reshape(1, -1, 1, 1)
    std = torch.tensor(data.std).reshape(1, -1, 1, 1)
    images = (data.images.float() / 255.0 - mean) / std

    def run(delta_: float) -> dict[str, Tensor]:
        w = {k: v.clone().requires_grad_(True) for k, v in init.items()}
        s_w = {k.removeprefix("student."): v for k, v in w.items() if k.startswith("student.")}
        (conn_w, conn_b), = [(w[k], w[k.replace("weight", "bias")]) for k in w
                             if k.startswith("terms.") and k.endswith("weight")]
        buf_t: dict[str, Tensor] = {}
        buf_k: dict[str, Tensor] = {}
        for epoch in range(2):
            order = epoch_order(len(data), seed, epoch)
            step_lr = lr * (0.1 if epoch >= 1 else 1.0)
            for i in range(3):
                idx = order[i * 16:(i + 1) * 16]
                x, y = images[idx], data.labels[idx]
                h, logits = _mlp_forward(s_w, x)
                with torch.no_grad():
                    t_h, t_logits = _mlp_forward(t_w, x)
                task = 0.1 * F.cross_entropy(logits, y)
                kl = F.kl_div(F.log_softmax(logits / T, 1), F.softmax(t_logits / T, 1), reduction="batchmean")
                distill = 0.9 * kl * T * T + F.mse_loss(F.linear(h, conn_w, conn_b), t_h)
                names = list(w)
                plist = [w[n] for n in names]
                g_k = torch.autograd.grad(distill, plist, retain_graph=True, allow_unused=True)
                g_t = torch.autograd.grad(task, plist, allow_unused=True)
                with torch.no_grad():
                    for n, gt, gk in zip(names, g_t, g_k):
                        p = w[n]
                        if gt is not None:
                            d = gt + wd * p
                            buf_t[n] = d.clone() if n not in buf_t else (beta - delta_) * buf_t[n] + d
                            p.sub_(step_lr * buf_t[n])
                        if gk is not None:
                            if n not in buf_k:
                                buf_k[n] = gk.clone()
                            elif gt is not None:
                                buf_k[n] = (beta + delta_) * buf_k[n] + gk
                            else:
                                buf_k[n] = beta * buf_k[n] + gk + wd * p
                            p.sub_(step_lr * buf_k[n])
        return {k: v.detach() for k, v in w.items()}

    ref = run(delta)
    assert set(ref) == set(got) and any(k.startswith("terms.") for k in got)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    # Sensitivity: the same run with delta = 0 (plain momentum on the summed gradient) ends elsewhere.
    plain = run(0.0)
    assert not torch.allclose(plain["student.fc.weight"], got["student.fc.weight"], atol=1e-5)


@pytest.mark.parametrize("option", ["optim.nesterov=true", "trainer.grad_clip=1.0"])
def test_options_dot_cannot_honour_are_refused_in_one_line(option: str) -> None:
    from kdforge.config import load_config
    from kdforge.errors import ConfigError

    terms = "terms=[{loss: ce, teacher: null, group: task}, {loss: ce, name: ce2, teacher: null, group: distill}]"
    with pytest.raises(ConfigError, match=option.split("=")[0].replace(".", r"\.") + " is not supported"):
        load_config(None, ["optim.name=dot", terms, option])
