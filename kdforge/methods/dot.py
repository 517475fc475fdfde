"""DOT, the Distillation-Oriented Trainer (Zhao et al., ICCV 2023), as a ``torch.optim.Optimizer``.

DOT changes the optimiser, not the loss. Each parameter keeps two SGD momentum buffers: one
for the task-loss gradient with momentum ``beta - delta`` and one for the distillation-loss
gradient with momentum ``beta + delta``. The step is the sum of both. The larger momentum on
the distillation direction is what the paper credits with "breaking the trade-off" between
the two losses.

The update follows the official ``DistillationOrientedTrainer`` in megvii-research/mdistiller
(``mdistiller/engine/dot.py``, function ``dot``). SGD without Nesterov, dampening 0, and, for
every parameter ``p`` with ``m_t = beta - delta``, ``m_k = beta + delta`` and
``m_1 = (m_k + m_t) / 2`` (= beta):

task side (``p`` has a task gradient ``g_t``), applied first::

    d = g_t + wd * p                       # weight decay is always added on the task side
    if m_t == 0:   step_t = d              # the official code keeps no task buffer then
    elif no task buffer yet: buf_t = d     # first step: buffer starts from the (decayed) gradient
    elif p also has a distill gradient: buf_t = m_t * buf_t + d
    else:          buf_t = m_1 * buf_t + d # parameter reached by the task loss only
    p -= lr * buf_t

distill side (``p`` has a distillation gradient ``g_k``)::

    if no distill buffer yet: buf_k = g_k  # raw gradient, *no* weight decay, even when task-less
    elif p also has a task gradient: buf_k = m_k * buf_k + g_k
    else:          buf_k = m_1 * buf_k + (g_k + wd * p)   # distill-only: decay added here
    p -= lr * buf_k

So a parameter reached by both losses moves by ``-lr * (buf_t + buf_k)`` (applied as two
in-place subtractions, like the reference), weight decay counted once. A parameter reached
by one loss is plain SGD with momentum ``beta``. "Reached" is decided per step: a gradient
that is ``None`` (the parameter is not in that loss's graph), exactly as ``p.grad is None``
after ``backward()`` in the reference.

Ways to drive it:

* ``opt.step_losses(task_loss, distill_loss, grad_scaler=None)``: computes both gradients
  itself (``torch.autograd.grad``, ``.grad`` untouched) and steps. It works with any pair of
  scalar losses and handles AMP loss scaling.
* The reference two-call protocol: ``zero_grad(); L_kd.backward(retain_graph=True);
  step_kd(); L_task.backward(); step()``.
* Plain ``step()`` with only ``.grad`` set and no ``step_kd()`` before it: the official
  code's path where every parameter counts as "task only". That is exactly
  ``torch.optim.SGD(momentum=beta, weight_decay=wd)`` (see :meth:`DOT.step`). It lets a
  generic trainer fall back to one combined backward.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from kdforge.registry import METHODS

GradMode = Literal["auto", "two_pass", "batched"]
_GRAD_MODES = ("auto", "two_pass", "batched")

__all__ = ["DOT", "dot_gradients"]


def _reached_leaves(loss: Tensor) -> set[int]:
    """ids of the leaf tensors in ``loss``'s autograd graph (what ``backward`` would give a ``.grad``)."""
    if not loss.requires_grad:
        return set()
    if loss.grad_fn is None:
        return {id(loss)}
    leaves: set[int] = set()
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)  # AccumulateGrad nodes carry their leaf
        if var is not None:
            leaves.add(id(var))
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return leaves


def _two_pass(task_loss: Tensor, distill_loss: Tensor, params: Sequence[Tensor]):
    """Reference order: distillation gradient first (graph retained), then the task gradient."""
    n = len(params)
    need_t, need_k = task_loss.requires_grad, distill_loss.requires_grad
    g_k: Sequence[Tensor | None] = [None] * n
    g_t: Sequence[Tensor | None] = [None] * n
    if need_k:
        g_k = torch.autograd.grad(distill_loss, params, retain_graph=need_t, allow_unused=True)
    if need_t:
        g_t = torch.autograd.grad(task_loss, params, allow_unused=True)
    return list(g_t), list(g_k)


def _batched(task_loss: Tensor, distill_loss: Tensor, params: Sequence[Tensor]):
    """Both gradients from one vmapped backward over the stacked losses (``is_grads_batched``).

    The graph is retained so that a failure part-way (an op without a vmap rule) can still
    fall back to two passes. Which parameters each loss reaches is read off the graph: the
    batched call returns zeros, not ``None``, for a parameter that only the other loss reaches.
    """
    stacked = torch.stack([task_loss.reshape(()), distill_loss.reshape(())])
    eye = torch.eye(2, dtype=stacked.dtype, device=stacked.device)
    grads = torch.autograd.grad(
        stacked, params, grad_outputs=eye, retain_graph=True, allow_unused=True, is_grads_batched=True
    )
    in_t, in_k = _reached_leaves(task_loss), _reached_leaves(distill_loss)
    g_t = [g[0] if g is not None and id(p) in in_t else None for p, g in zip(params, grads)]
    g_k = [g[1] if g is not None and id(p) in in_k else None for p, g in zip(params, grads)]
    return g_t, g_k


def dot_gradients(
    task_loss: Tensor, distill_loss: Tensor, params: Sequence[Tensor], mode: GradMode = "two_pass"
) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """Gradients of each loss w.r.t. ``params``; ``None`` where a loss does not reach a parameter.

    ``two_pass``: two ``autograd.grad`` calls, as the reference does. ``batched``: one vmapped
    backward (raises if an op in the graph cannot be vmapped). ``auto`` is ``two_pass``. On CPU
    the batched pass was slower (see ``benchmarks/dot_step.py``): the two VJPs cost the same
    FLOPs either way, and vmap adds ``cat``/loop overhead in the convolution backward.
    """
    for name, loss in (("task_loss", task_loss), ("distill_loss", distill_loss)):
        if loss.numel() != 1:
            raise ValueError(f"DOT: {name} must be a scalar, got shape {tuple(loss.shape)}")
    if mode == "batched" and task_loss.requires_grad and distill_loss.requires_grad:
        return _batched(task_loss, distill_loss, params)
    return _two_pass(task_loss, distill_loss, params)


class DOT(Optimizer):
    """SGD with separate task / distillation momentum buffers (``beta -/+ delta``).

    Args:
        params: parameters or param groups. A group may override ``lr``, ``momentum``,
            ``delta`` and ``weight_decay``. LR schedulers, and momentum cycling, act on
            these keys and are read every step.
        lr: learning rate.
        momentum: ``beta``. Task buffers use ``beta - delta`` and distill buffers
            ``beta + delta``. Parameters reached by one loss use ``beta``.
        delta: ``Delta`` (paper: 0.075 for CIFAR-100 and Tiny-ImageNet, 0.09 for ImageNet).
        weight_decay: L2 added to the task gradient only (to the distill gradient for
            distill-only parameters), so shared parameters decay once.
        grad_mode: how :meth:`step_losses` gets both gradients: ``"two_pass"``,
            ``"batched"`` (one vmapped backward; falls back to two passes, with one warning,
            when the graph cannot be vmapped) or ``"auto"`` (currently ``"two_pass"``: the
            faster one in our CPU measurements).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        momentum: float = 0.9,
        delta: float = 0.075,
        weight_decay: float = 0.0,
        *,
        grad_mode: GradMode = "auto",
    ) -> None:
        if grad_mode not in _GRAD_MODES:
            raise ValueError(f"DOT: grad_mode must be one of {_GRAD_MODES}, got {grad_mode!r}")
        defaults = dict(lr=lr, momentum=momentum, delta=delta, weight_decay=weight_decay)
        self.grad_mode: GradMode = grad_mode
        self._init_transient()
        super().__init__(params, defaults)

    def _init_transient(self) -> None:
        # Distillation gradients handed over by step_kd(), consumed by the next step().
        self._kd_grads: dict[Tensor, Tensor] = {}
        # (task grads, distill grads, scaler) staged by step_losses() for step().
        self._pending: tuple[dict[Tensor, Tensor], dict[Tensor, Tensor], Any] | None = None
        self._batched_failed = False

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._init_transient()
        for group in self.param_groups:
            group.setdefault("delta", 0.075)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate a group's hyper-parameters as well (each group may override them)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        lr, beta, delta, wd = group["lr"], group["momentum"], group["delta"], group["weight_decay"]
        if lr < 0.0:
            raise ValueError(f"DOT: invalid lr {lr}")
        if wd < 0.0:
            raise ValueError(f"DOT: invalid weight_decay {wd}")
        if delta < 0.0 or beta - delta < 0.0:
            raise ValueError(f"DOT: need 0 <= delta <= momentum, got momentum={beta}, delta={delta}")
        if beta + delta >= 1.0:
            raise ValueError(f"DOT: momentum + delta must stay below 1, got {beta} + {delta}")

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    # ------------------------------------------------------------------ public API

    def step_losses(
        self,
        task_loss: Tensor,
        distill_loss: Tensor,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> bool:
        """Differentiate both losses and apply one DOT update. Returns False if AMP skipped it.

        Loss weights must already be folded into the two losses. Either may be a feature,
        logit or relation loss; only the scalars matter. ``.grad`` is not read or written,
        except with an enabled ``grad_scaler``. In that case the scaled sum of both
        gradients is placed in ``.grad`` for ``grad_scaler.unscale_``. That public call
        records the inf/NaN check, so the usual ``grad_scaler.update()`` afterwards backs
        off or grows the scale as with any optimiser. A non-finite gradient of either loss
        makes the sum non-finite, and ``grad_scaler.step`` then skips the update. ``.grad``
        is left ``None``. bf16 autocast needs no scaler.
        """
        params = self._params()
        if grad_scaler is not None:
            task_loss, distill_loss = grad_scaler.scale(task_loss), grad_scaler.scale(distill_loss)
        g_t, g_k = self._gradients(task_loss, distill_loss, params)
        task = {p: g for p, g in zip(params, g_t) if g is not None}
        kd = {p: g for p, g in zip(params, g_k) if g is not None}
        if not task and not kd:
            raise ValueError("DOT.step_losses: neither loss depends on any optimised parameter")
        self._pending = (task, kd, grad_scaler)
        try:
            if grad_scaler is None or not grad_scaler.is_enabled():
                self.step()
            else:
                for p in params:  # .grad is scratch space for the scaler's inf/NaN check
                    gt, gk = task.get(p), kd.get(p)
                    if gt is not None and gk is not None:
                        p.grad = gt + gk
                    elif gt is not None or gk is not None:
                        p.grad = (gt if gt is not None else gk).clone()  # unscale_ works in place
                    else:
                        p.grad = None
                grad_scaler.unscale_(self)
                grad_scaler.step(self)
        finally:
            applied = self._pending is None  # step() consumed it
            self._pending = None
            if grad_scaler is not None and grad_scaler.is_enabled():
                for p in params:
                    p.grad = None
        return applied

    @torch.no_grad()
    def step_kd(self) -> None:
        """Reference protocol, part 1: take the current ``.grad`` as the distillation gradient.

        The gradients are moved out (``p.grad`` becomes ``None``), so the following task
        ``backward()`` cannot accumulate into them even if ``zero_grad`` is forgotten or
        called with ``set_to_none=False``. With AMP loss scaling use :meth:`step_losses` with
        ``grad_scaler`` instead: ``GradScaler.unscale_`` only sees ``.grad``, not these.
        """
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._kd_grads[p] = p.grad
                    p.grad = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Apply one DOT update.

        Sources, in order: gradients staged by :meth:`step_losses`; otherwise ``.grad`` as
        the task gradient plus whatever :meth:`step_kd` handed over (the reference
        protocol). With ``.grad`` alone and no ``step_kd()`` before it, every parameter is
        "task only". The update is then ``buf = beta * buf + (g + wd * p)`` (first step
        ``buf = g + wd * p``), ``p -= lr * buf``, exactly ``torch.optim.SGD(momentum=beta,
        weight_decay=wd)``, as in the official ``dot()`` when ``step_kd`` was not called.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._pending is not None:
            task, kd, scaler = self._pending
            self._pending = None
            if scaler is not None and scaler.is_enabled():
                inv = 1.0 / scaler.get_scale()
                for grads in (task, kd):
                    if grads:
                        torch._foreach_mul_(list(grads.values()), inv)
        else:
            task = {p: p.grad for g in self.param_groups for p in g["params"] if p.grad is not None}
            kd, self._kd_grads = self._kd_grads, {}
        self._update(task, kd)
        return loss

    # ------------------------------------------------------------------ internals

    def _gradients(self, task_loss: Tensor, distill_loss: Tensor, params: list[Tensor]):
        mode = "two_pass" if self.grad_mode == "auto" or self._batched_failed else self.grad_mode
        if mode == "batched":
            try:
                return dot_gradients(task_loss, distill_loss, params, "batched")
            except RuntimeError as err:  # an op without a batching rule / non-vmappable Function
                self._batched_failed = True
                warnings.warn(
                    f"DOT: batched gradients unsupported for this graph ({str(err).splitlines()[0][:200]}); "
                    "using two backward passes from now on",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return dot_gradients(task_loss, distill_loss, params, "two_pass")

    @torch.no_grad()
    def _update(self, task: Mapping[Tensor, Tensor], kd: Mapping[Tensor, Tensor]) -> None:
        """The official ``dot()`` update per group; buffers live in ``self.state[p]``.

        The heavy element-wise work goes through ``torch._foreach_*``. Each op is the
        same as the reference's per-tensor op (mul, add, add with alpha), so results are
        identical to the reference loop.
        """
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            beta, delta = group["momentum"], group["delta"]
            m_task, m_kd = beta - delta, beta + delta
            m_single = (m_kd + m_task) / 2.0  # as the reference computes it
            params = group["params"]

            # Task side (reference: first loop of dot(), all task updates before distill ones).
            t_params = [p for p in params if p in task]
            if t_params:
                t_grads = [task[p] for p in t_params]
                ds = torch._foreach_add(t_grads, t_params, alpha=wd) if wd != 0 else t_grads
                directions: list[Tensor] = []
                upd_bufs, upd_ds, upd_moms = [], [], []
                for p, d in zip(t_params, ds):
                    if m_task == 0:
                        directions.append(d)
                        continue
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.clone(d).detach()
                    else:
                        upd_bufs.append(buf)
                        upd_ds.append(d)
                        upd_moms.append(m_task if p in kd else m_single)
                    directions.append(buf)
                if upd_bufs:
                    torch._foreach_mul_(upd_bufs, upd_moms)
                    torch._foreach_add_(upd_bufs, upd_ds)
                torch._foreach_add_(t_params, directions, alpha=-lr)

            # Distillation side (reference: second loop of dot()).
            k_params = [p for p in params if p in kd]
            if k_params:
                directions = []
                upd_bufs, upd_ds, upd_moms = [], [], []
                decay_p, decay_i = [], []
                for p in k_params:
                    g = kd[p]
                    state = self.state[p]
                    buf = state.get("momentum_kd_buffer")
                    if buf is None:  # raw gradient, no weight decay (reference behaviour)
                        buf = state["momentum_kd_buffer"] = torch.clone(g).detach()
                    else:
                        upd_bufs.append(buf)
                        if p in task:
                            upd_moms.append(m_kd)
                        else:
                            upd_moms.append(m_single)
                            if wd != 0:
                                decay_p.append(p)
                                decay_i.append(len(upd_ds))
                        upd_ds.append(g)
                    directions.append(buf)
                if decay_p:
                    decayed = torch._foreach_add([upd_ds[i] for i in decay_i], decay_p, alpha=wd)
                    for i, d in zip(decay_i, decayed):
                        upd_ds[i] = d
                if upd_bufs:
                    torch._foreach_mul_(upd_bufs, upd_moms)
                    torch._foreach_add_(upd_bufs, upd_ds)
                torch._foreach_add_(k_params, directions, alpha=-lr)


METHODS.register(
    "dot",
    DOT,
    family="optimizer",
    paper="DOT: A Distillation-Oriented Trainer (Zhao et al., ICCV 2023)",
    summary="SGD with separate task (beta - delta) and distillation (beta + delta) momentum buffers; "
    "select with optim.name=dot",
)
