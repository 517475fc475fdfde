"""TinyCLIP's automatic weight inheritance: L0 hard-concrete masks on a CLIP, then fusion into a smaller one.

Masks (CoFi-style, card p06) on every encoder layer of both towers: one per attention head, one
per MLP neuron, one per whole attention block and one per whole MLP block. Each is a
hard-concrete gate (limits -0.1 / 1.1, temperature 2/3, log-alpha initialised high: keep all):
sampled in training, deterministic in evaluation. The expected sparsity is computed from the
gates' keep-probabilities and the parameters each gate controls, summed over BOTH towers, so
the budget moves to whichever tower can spare it. `fuse` folds the deterministic gate values
into the weights and drops every zero-gated head / neuron / block: the fused model computes
exactly what the masked model computes (hidden-dim masks are not built: a LayerNorm over fewer
dims would not reproduce the masked model).

A fused model may keep a different number of heads and neurons per layer, which a
`CLIPConfig` cannot describe: it is a `CLIPModel` whose layers were resized in place.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from kdforge.distill.distiller import Step
from kdforge.tasks.vision_language.task import ClipModule

__all__ = ["ClipMasks", "HardConcrete", "MaskedClipModule", "fuse", "masked_structure"]

LIMIT_L, LIMIT_R, BETA = -0.1, 1.1, 2.0 / 3.0
TOWERS = ("vision_model", "text_model")


class HardConcrete(nn.Module):
    """Gates z in [0, 1] with an exact-zero mass; log_alpha = init + gain * raw (gain sets its speed under
    the run's single learning rate)."""

    def __init__(self, shape: tuple[int, ...], init: float = 3.0, gain: float = 1.0) -> None:
        super().__init__()
        self.raw = nn.Parameter(torch.zeros(shape))
        self.init, self.gain = float(init), float(gain)

    def log_alpha(self) -> Tensor:
        return self.init + self.gain * self.raw

    def forward(self, sample: bool | None = None) -> Tensor:
        """Sampled gates (training, or `sample=True`) or the deterministic ones."""
        la = self.log_alpha()
        if self.training if sample is None else sample:
            u = torch.rand_like(la).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((u.log() - (1 - u).log() + la) / BETA)
        else:
            s = torch.sigmoid(la)
        return (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0.0, 1.0)

    def keep_prob(self) -> Tensor:
        """P(z > 0)."""
        return torch.sigmoid(self.log_alpha() - BETA * math.log(-LIMIT_L / LIMIT_R))


def _towers(model: Any) -> dict[str, Any]:
    return {t: getattr(model, t) for t in TOWERS}


class ClipMasks(nn.Module):
    """Head / neuron / block gates for every layer of a CLIP's two towers, applied by forward hooks."""

    def __init__(self, model: Any, init: float = 3.0, gain: float = 1.0) -> None:
        super().__init__()
        self.gates = nn.ModuleDict()
        self.sizes: dict[str, tuple[int, int, int, int]] = {}      # tower -> (layers, width, heads, mlp)
        for name, tower in _towers(model).items():
            c = tower.config
            layers, heads, mlp = c.num_hidden_layers, c.num_attention_heads, c.intermediate_size
            self.sizes[name] = (layers, c.hidden_size, heads, mlp)
            for kind, shape in (("head", (layers, heads)), ("neuron", (layers, mlp)), ("mha", (layers,)),
                                ("ffn", (layers,))):
                self.gates[f"{name}_{kind}"] = HardConcrete(shape, init, gain)

    def z(self, tower: str, kind: str, sample: bool | None = None) -> Tensor:
        return self.gates[f"{tower}_{kind}"](sample)

    def total_params(self) -> float:
        """Parameters the gates control (attention and MLP weight matrices of both towers)."""
        return float(sum(L * (4 * d * d + 2 * d * m) for L, d, _, m in self.sizes.values()))

    def expected_sparsity(self) -> Tensor:
        """1 - E[kept controlled parameters] / all controlled parameters, over both towers."""
        kept = 0.0
        for tower, (_, d, h, _) in self.sizes.items():
            p = {k: self.gates[f"{tower}_{k}"].keep_prob() for k in ("head", "neuron", "mha", "ffn")}
            head_params = 4 * d * (d // h)
            kept = kept + (p["mha"] * p["head"].sum(1)).sum() * head_params
            kept = kept + (p["ffn"] * p["neuron"].sum(1)).sum() * 2 * d
        return 1 - kept / self.total_params()

    def install(self, model: Any) -> list[Any]:
        """Hooks applying the gates in `model`'s forward (head gates on out_proj's input, block gates on
        out_proj's / fc2's output, neuron gates on fc2's input); returns the handles."""
        handles = []
        for tower, (_, d, h, _) in self.sizes.items():
            for i, layer in enumerate(getattr(model, tower).encoder.layers):
                attn, mlp = layer.self_attn, layer.mlp
                handles += [attn.out_proj.register_forward_pre_hook(self._gate_input(tower, "head", i, d // h)),
                            attn.out_proj.register_forward_hook(self._gate_output(tower, "mha", i)),
                            mlp.fc2.register_forward_pre_hook(self._gate_input(tower, "neuron", i, 1)),
                            mlp.fc2.register_forward_hook(self._gate_output(tower, "ffn", i))]
        return handles


    def _gate_input(self, tower: str, kind: str, layer: int, repeat: int) -> Any:
        def hook(mod: nn.Module, args: tuple) -> tuple:
            return (args[0] * self.z(tower, kind, mod.training)[layer].repeat_interleave(repeat),)
        return hook

    def _gate_output(self, tower: str, kind: str, layer: int) -> Any:
        def hook(mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
            return out * self.z(tower, kind, mod.training)[layer]
        return hook


class _Constant(nn.Module):
    """A pruned block: its output no longer depends on the input (the gated bias, often 0)."""

    def __init__(self, bias: Tensor, attention: bool) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())
        self.attention = attention

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.bias.expand_as(hidden_states)
        return (out, None) if self.attention else out


def _linear(weight: Tensor, bias: Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0])
    lin.weight.data.copy_(weight)
    lin.bias.data.copy_(bias)
    return lin


@torch.no_grad()
def fuse(model: Any, masks: ClipMasks) -> Any:
    """A copy of `model` with the deterministic gates folded in and zero-gated heads / neurons / blocks removed."""
    was = masks.training
    masks.eval()
    fused = copy.deepcopy(model)
    for m in fused.modules():           # the copy must not carry the masked model's hooks
        m._forward_pre_hooks.clear()
        m._forward_hooks.clear()
    for tower, (_, d, h, _) in masks.sizes.items():
        hd = d // h
        zh, zn, zm, zf = (masks.z(tower, k) for k in ("head", "neuron", "mha", "ffn"))
        for i, layer in enumerate(getattr(fused, tower).encoder.layers):
            attn = layer.self_attn
            keep = [j for j in range(h) if zh[i, j] > 0]
            if not keep or zm[i] == 0:
                layer.self_attn = _Constant(attn.out_proj.bias * zm[i], attention=True)
            else:
                rows = torch.cat([torch.arange(j * hd, (j + 1) * hd) for j in keep])
                for name in ("q_proj", "k_proj", "v_proj"):
                    lin = getattr(attn, name)
                    setattr(attn, name, _linear(lin.weight[rows], lin.bias[rows]))
                scale = zh[i].repeat_interleave(hd)[rows] * zm[i]
                attn.out_proj = _linear(attn.out_proj.weight[:, rows] * scale, attn.out_proj.bias * zm[i])
                attn.num_heads = len(keep)
                attn.embed_dim = d
            mlp = layer.mlp
            keep_n = (zn[i] > 0).nonzero().flatten()
            if len(keep_n) == 0 or zf[i] == 0:
                layer.mlp = _Constant(mlp.fc2.bias * zf[i], attention=False)
            else:
                mlp.fc1 = _linear(mlp.fc1.weight[keep_n], mlp.fc1.bias[keep_n])
                mlp.fc2 = _linear(mlp.fc2.weight[:, keep_n] * zn[i][keep_n] * zf[i], mlp.fc2.bias * zf[i])
    masks.train(was)
    return fused


@torch.no_grad()
def masked_structure(masks: ClipMasks) -> dict[str, dict[str, list[int]]]:
    """Per tower: heads and MLP neurons each layer keeps under the deterministic gates (0 for a removed block)."""
    was = masks.training
    masks.eval()
    out: dict[str, dict[str, list[int]]] = {}
    for tower in masks.sizes:
        zh, zn, zm, zf = (masks.z(tower, k) for k in ("head", "neuron", "mha", "ffn"))
        out[tower.removesuffix("_model")] = {
            "heads": [int((zh[i] > 0).sum()) if zm[i] > 0 else 0 for i in range(len(zm))],
            "neurons": [int((zn[i] > 0).sum()) if zf[i] > 0 else 0 for i in range(len(zf))]}
    masks.train(was)
    return out


class MaskedClipModule(ClipModule):
    """The student under gates: TinyCLIP's loss plus the Lagrangian sparsity term.

    penalty = l1 * max(0, s* - s) + l2 * max(0, s* - s)^2, with s the expected sparsity and the
    target s* ramped linearly from 0 to `target` over `ramp_steps` optimizer steps; the
    multipliers l1, l2 start at `lambda_init` and rise by gradient ascent (lr `lambda_lr`) after
    every step, so the constraint tightens until the masks meet it.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, masks: ClipMasks, target: float,
                 ramp_steps: int, lambda_init: float = 10.0, lambda_lr: float = 0.02, **weights: Any) -> None:
        super().__init__(student, teacher, **weights)
        self.masks = masks
        masks.install(student)
        self.target, self.ramp_steps, self.lambda_lr = float(target), max(1, int(ramp_steps)), float(lambda_lr)
        self.register_buffer("lambdas", torch.full((2,), float(lambda_init)))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self._gap: Tensor | None = None

    def target_now(self) -> float:
        return self.target * min(1.0, float(self.steps_done) / self.ramp_steps)

    def forward(self, batch: Any) -> Step:
        step = super().forward(batch)
        gap = torch.relu(self.target_now() - self.masks.expected_sparsity())
        step.losses["lagrangian"] = self.lambdas[0] * gap + self.lambdas[1] * gap ** 2
        step.groups["lagrangian"] = "task"
        self._gap = gap.detach()
        return step

    def after_optimizer_step(self, step: int) -> None:
        super().after_optimizer_step(step)
        with torch.no_grad():
            if self._gap is not None:        # gradient ascent on the multipliers: d penalty / d lambda
                self.lambdas += self.lambda_lr * torch.stack([self._gap, self._gap ** 2])
            self.steps_done += 1
