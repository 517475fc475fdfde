"""MDCS: More Diverse Experts with Consistency Self-distillation (Zhao et al., ICCV 2023).

Long-tailed classification with E experts (RIDE/SADE layout: a shared stem and first stage,
separate later stages and a cosine classifier of scale s per expert) and no external teacher:

* Diversity loss (DL): expert e is trained with cross-entropy on prior-shifted logits
  z_e + lam_e * log n (n = training class counts); lam = (-0.5, 1, 2.5) makes one expert favour
  the head, one balanced (logit adjustment) and one the tail. CE covers both views.
* Consistency self-distillation (CS): every image is seen twice, weak view first, strong view
  second. Per expert, the detached softmax of its shifted logits on the weak view teaches its
  log-softmax on the strong view (KL, temperature 1), only on *confident instances* (CIS:
  weak-view argmax == label, masked per expert), `batchmean` over the selected rows.
* L = L_DL + cs_weight * min((epoch+1) / ramp, 1) * L_CS; the official trainer counts epochs from
  1, so our 0-based epoch e gets the weight of its epoch e+1.
* Inference: the mean of the experts' *raw* logits (`ExpertAverage`).

Views: the weak view is the trainer's crop/flip batch plus a +-15 degree rotation (black fill);
the strong view is rebuilt from the raw uint8 images: an independent crop/flip, AutoAugment's
CIFAR-10 policy and Cutout (half the image side), as the official loader does, all batched in
torch and a pure function of (seed, epoch, sample index) like `kdforge.data.transforms`.
Official code: https://github.com/fistyee/MDCS (model/loss.py::MDCSLoss).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.data.transforms import apply_crop_flip, crop_flip_params, hash_u32, normalize, to_float
from kdforge.distill.distiller import Batch, Distiller, Step
from kdforge.distill.terms import Term
from kdforge.errors import KdforgeError
from kdforge.models._blocks import BasicBlock, make_layer
from kdforge.models._common import init_conv_bn
from kdforge.registry import METHODS

DEFAULT_LAMBDAS = (-0.5, 1.0, 2.5)

# --------------------------------------------------------------------------------------------
# Pure loss pieces
# --------------------------------------------------------------------------------------------


def prior_shifted_logits(logits: Tensor, class_counts: Tensor, lam: float) -> Tensor:
    """z + lam * log(n + 1e-9): logit adjustment with prior power `lam` (counts; constants cancel)."""
    return logits + lam * torch.log(class_counts.to(logits) + 1e-9)


def diversity_loss(expert_logits: Tensor, target: Tensor, class_counts: Tensor, lambdas: Sequence[float]) -> Tensor:
    """sum_e CE(z_e + lam_e log n, y) over every row of `expert_logits` (N, E, C)."""
    _check_experts(expert_logits, lambdas)
    return sum((F.cross_entropy(prior_shifted_logits(expert_logits[:, e], class_counts, lam), target)
                for e, lam in enumerate(lambdas)), expert_logits.new_zeros(()))


def confident_mask(teacher_logits: Tensor, target: Tensor) -> Tensor:
    """Confident instance sampling: rows whose (weak-view, prior-shifted) argmax is the label."""
    return teacher_logits.argmax(dim=1) == target


def consistency_kd(teacher_logits: Tensor, student_logits: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2, mean over the rows selected by `mask`.

    The teacher side is detached (the weak view only supervises); an empty mask gives 0.
    """
    if not bool(mask.any()):
        return student_logits.sum() * 0.0
    p = F.softmax(teacher_logits[mask].detach() / temperature, dim=1)
    log_q = F.log_softmax(student_logits[mask] / temperature, dim=1)
    return F.kl_div(log_q, p, reduction="batchmean") * temperature**2


def cs_ramp(epoch: int, ramp_epochs: float) -> float:
    """Weight ramp of the consistency loss: min((epoch + 1) / ramp, 1) for 0-based `epoch`."""
    if ramp_epochs <= 0:
        return 1.0
    return min((epoch + 1) / ramp_epochs, 1.0)


def mdcs_losses(expert_logits: Tensor, target: Tensor, class_counts: Tensor, lambdas: Sequence[float],
                temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """(L_DL, L_CS unweighted, confident fraction per expert) for (2B, E, C) logits, weak rows first.

    `target` holds the B labels of the weak (= strong) views.
    """
    _check_experts(expert_logits, lambdas)
    b = target.shape[0]
    if expert_logits.shape[0] != 2 * b:
        raise KdforgeError(f"MDCS expects 2B rows (weak then strong views) for B={b} labels, "
                           f"got {expert_logits.shape[0]}")
    dl = diversity_loss(expert_logits, torch.cat([target, target]), class_counts, lambdas)
    cs = expert_logits.new_zeros(())
    fractions = []
    for e, lam in enumerate(lambdas):
        shifted = prior_shifted_logits(expert_logits[:, e], class_counts, lam)
        weak, strong = shifted[:b], shifted[b:]
        mask = confident_mask(weak.detach(), target)
        cs = cs + consistency_kd(weak, strong, mask, temperature)
        fractions.append(mask.float().mean())
    return dl, cs, torch.stack(fractions)


def _check_experts(expert_logits: Tensor, lambdas: Sequence[float]) -> None:
    if expert_logits.dim() != 3 or expert_logits.shape[1] != len(lambdas):
        raise KdforgeError(f"expected expert logits (N, {len(lambdas)}, C) for {len(lambdas)} lambdas, "
                           f"got {tuple(expert_logits.shape)}")


# --------------------------------------------------------------------------------------------
# Multi-expert model
# --------------------------------------------------------------------------------------------


class NormedLinear(nn.Module):
    """Cosine classifier: normalised features times normalised class weights, times `scale`."""

    def __init__(self, in_features: int, out_features: int, scale: float = 30.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-1, 1))
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).t()


class MultiExpertResNet(nn.Module):
    """Shared stem + stage 1 of a CIFAR ResNet, then E private copies of stages 2-3 and a head each.

    `forward` returns per-expert logits (B, E, C). `reduce_dimension` narrows the private stages
    to 3/4 width (32/64 -> 24/48 on ResNet-32), as the RIDE/MDCS code does, so that three experts
    cost about as much as two full networks.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, num_experts: int = 3,
                 reduce_dimension: bool = True, normed: bool = True, scale: float = 30.0) -> None:
        super().__init__()
        needed = ("conv1", "bn1", "layer1", "layer2", "layer3")
        if not all(hasattr(backbone, n) for n in needed) or hasattr(backbone, "layer4"):
            raise KdforgeError(f"MDCS builds experts from a 3-stage CIFAR ResNet student (resnet8..resnet110, "
                               f"resnet8x4, resnet32x4); got {type(backbone).__name__}")
        if num_experts < 1:
            raise KdforgeError(f"MDCS needs num_experts >= 1, got {num_experts}")
        self.num_experts = num_experts
        self.conv1, self.bn1, self.relu = backbone.conv1, backbone.bn1, nn.ReLU()
        self.layer1 = backbone.layer1
        blocks = len(backbone.layer1)
        factor = 0.75 if reduce_dimension else 1.0
        w1 = backbone.layer1[-1].conv2.out_channels
        w2 = int(round(backbone.layer2[-1].conv2.out_channels * factor))
        w3 = int(round(backbone.layer3[-1].conv2.out_channels * factor))
        experts = []
        for _ in range(num_experts):
            layer2, _planes = make_layer(BasicBlock, w1, w2, blocks, stride=2)
            layer3, _planes = make_layer(BasicBlock, w2, w3, blocks, stride=2)
            experts.append(nn.Sequential(layer2, layer3, nn.AdaptiveAvgPool2d(1), nn.Flatten()))
        self.experts = nn.ModuleList(experts)
        init_conv_bn(self.experts)
        self.heads = nn.ModuleList(NormedLinear(w3, num_classes, scale) if normed else nn.Linear(w3, num_classes)
                                   for _ in range(num_experts))

    def forward(self, x: Tensor) -> Tensor:
        shared = self.layer1(self.relu(self.bn1(self.conv1(x))))
        return torch.stack([head(expert(shared)) for expert, head in zip(self.experts, self.heads)], dim=1)


class ExpertAverage(nn.Module):
    """Test-time model: the mean of the experts' raw logits (no prior term)."""

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.net = experts

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).mean(dim=1)


# --------------------------------------------------------------------------------------------
# Views: weak rotation, strong augmentation (batched, deterministic per (seed, epoch, index))
# --------------------------------------------------------------------------------------------

_STREAM = 0x4D4443   # "MDC": MDCS's own hash streams, disjoint from crop/flip's 1..3
_STRONG_SEED_OFFSET = 1 << 32   # the strong crop/flip uses another seed word than the weak one


def uniform(index: Tensor, seed: int, epoch: int, stream: int) -> Tensor:
    """Uniform [0, 1) floats, one per sample, a pure function of (seed, epoch, index, stream)."""
    return hash_u32(index, seed, epoch, _STREAM + stream).double().div(2.0**32).float()


def affine_warp(images: Tensor, matrices: Tensor, fill: Tensor | float) -> Tensor:
    """Warp (N, C, H, W) by per-sample 2x3 matrices (output -> input, in [-1, 1] coordinates);
    pixels sampled from outside the image get `fill` (scalar or per-channel)."""
    grid = F.affine_grid(matrices.to(images.dtype), list(images.shape), align_corners=False)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    inside = F.grid_sample(torch.ones_like(images[:, :1]), grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)
    fill_t = torch.as_tensor(fill, dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)
    return warped + (1.0 - inside) * fill_t


def rotation_matrices(angles_deg: Tensor) -> Tensor:
    """(N, 2, 3) rotations about the image centre."""
    a = angles_deg * (math.pi / 180.0)
    c, s = torch.cos(a), torch.sin(a)
    z = torch.zeros_like(a)
    return torch.stack([torch.stack([c, -s, z], 1), torch.stack([s, c, z], 1)], 1)


def _q(x: Tensor) -> Tensor:
    """Back onto the uint8 grid (PIL works on 8-bit images between operations)."""
    return torch.round(x.clamp(0.0, 1.0) * 255.0) / 255.0


def _gray(x: Tensor) -> Tensor:
    """ITU-R 601-2 luma (PIL's "L" conversion) as (N, 1, H, W)."""
    if x.shape[1] != 3:
        return x.mean(dim=1, keepdim=True)
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    """PIL ImageEnhance: degenerate + factor * (x - degenerate), clipped."""
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp(0.0, 1.0)


def _smooth(x: Tensor) -> Tensor:
    """PIL's SMOOTH filter (3x3, centre 5, others 1, /13); border pixels are kept, as PIL does."""
    c = x.shape[1]
    kernel = torch.ones(c, 1, 3, 3, dtype=x.dtype, device=x.device)
    kernel[:, :, 1, 1] = 5.0
    inner = F.conv2d(x, kernel / 13.0, groups=c)
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = inner
    return out


def _equalize(x: Tensor) -> Tensor:
    """PIL ImageOps.equalize per channel: lut[i] = (cum_before_i + step // 2) // step, step from the
    histogram without its last non-empty bin; a channel with step 0 is left unchanged."""
    n, c, h, w = x.shape
    v = torch.round(x * 255.0).long().clamp(0, 255).view(n * c, h * w)
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, v, torch.ones_like(v))
    last = (hist > 0).long().mul(torch.arange(256, device=x.device)).argmax(dim=1, keepdim=True)
    step = (h * w - hist.gather(1, last)) // 255
    before = hist.cumsum(dim=1) - hist
    lut = ((before + step // 2) // step.clamp_min(1)).clamp_max(255)
    lut = torch.where(step > 0, lut, torch.arange(256, device=x.device).expand_as(lut))
    return (lut.gather(1, v).view(n, c, h, w).to(x.dtype)) / 255.0


def _colour_op(name: str, x: Tensor, m: Tensor, sign: Tensor) -> Tensor:
    """One photometric AutoAugment operation (PIL semantics) at per-sample magnitudes `m`."""
    f = 1.0 + m * sign                                     # ImageEnhance factor
    if name == "brightness":
        return _blend(torch.zeros_like(x), x, f)
    if name == "color":
        return _blend(_gray(x).expand_as(x), x, f)
    if name == "contrast":
        return _blend(_q(_gray(x)).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), x, f)
    if name == "sharpness":
        return _blend(_smooth(x), x, f)
    if name == "solarize":                                 # m = threshold in 0..256 pixel units
        return torch.where(x * 255.0 >= m.view(-1, 1, 1, 1) - 1e-4, 1.0 - x, x)
    if name == "posterize":                                # m = bits kept
        step = torch.pow(2.0, 8.0 - m).view(-1, 1, 1, 1)
        return torch.floor(torch.round(x * 255.0) / step) * step / 255.0
    if name == "autocontrast":
        lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
        return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-6), x)
    if name == "equalize":
        return _equalize(x)
    if name == "invert":
        return 1.0 - x
    raise KdforgeError(f"unknown colour operation {name}")


def _geometric_matrix(name: str, m: Tensor, sign: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, 2, 3) output->input matrix, in [-1, 1] coordinates, of a PIL affine operation.

    PIL shears about the top-left corner (x_in = x + m*y in pixels), translates by m * side
    pixels and rotates counter-clockwise by m degrees about the centre.
    """
    if name == "rotate":
        return rotation_matrices(m)
    h, w = size
    mat = torch.zeros(m.shape[0], 2, 3, device=m.device)
    mat[:, 0, 0] = mat[:, 1, 1] = 1.0
    v = m * sign
    if name == "shearX":
        mat[:, 0, 1], mat[:, 0, 2] = v * h / w, v * h / w - v / w
    elif name == "shearY":
        mat[:, 1, 0], mat[:, 1, 2] = v * w / h, v * w / h - v / h
    elif name == "translateX":
        mat[:, 0, 2] = 2.0 * v
    elif name == "translateY":
        mat[:, 1, 2] = 2.0 * v
    else:
        raise KdforgeError(f"unknown geometric operation {name}")
    return mat


GEOMETRIC_OPS = ("shearX", "shearY", "translateX", "translateY", "rotate")
COLOUR_OPS = ("color", "posterize", "solarize", "contrast", "sharpness", "brightness", "autocontrast",
              "equalize", "invert")


def _levels(lo: float, hi: float) -> list[float]:
    return [lo + (hi - lo) * i / 9 for i in range(10)]


# Magnitude of level 0..9 of each operation, as in the AutoAugment paper's search space.
MAGNITUDES: dict[str, list[float]] = {
    "shearX": _levels(0, 0.3), "shearY": _levels(0, 0.3),
    "translateX": _levels(0, 150 / 331), "translateY": _levels(0, 150 / 331),
    "rotate": _levels(0, 30), "color": _levels(0, 0.9), "contrast": _levels(0, 0.9),
    "sharpness": _levels(0, 0.9), "brightness": _levels(0, 0.9),
    "posterize": [float(round(v)) for v in _levels(8, 4)], "solarize": _levels(256, 0),
    "autocontrast": [0.0] * 10, "equalize": [0.0] * 10, "invert": [0.0] * 10,
}

# The 25 CIFAR-10 sub-policies of AutoAugment (Cubuk et al., CVPR 2019, Table 7):
# (probability, operation, magnitude level) twice; one sub-policy is drawn per image.
CIFAR10_POLICY: tuple[tuple[float, str, int, float, str, int], ...] = (
    (0.1, "invert", 7, 0.2, "contrast", 6), (0.7, "rotate", 2, 0.3, "translateX", 9),
    (0.8, "sharpness", 1, 0.9, "sharpness", 3), (0.5, "shearY", 8, 0.7, "translateY", 9),
    (0.5, "autocontrast", 8, 0.9, "equalize", 2), (0.2, "shearY", 7, 0.3, "posterize", 7),
    (0.4, "color", 3, 0.6, "brightness", 7), (0.3, "sharpness", 9, 0.7, "brightness", 9),
    (0.6, "equalize", 5, 0.5, "equalize", 1), (0.6, "contrast", 7, 0.6, "sharpness", 5),
    (0.7, "color", 7, 0.5, "translateX", 8), (0.3, "equalize", 7, 0.4, "autocontrast", 8),
    (0.4, "translateY", 3, 0.2, "sharpness", 6), (0.9, "brightness", 6, 0.2, "color", 8),
    (0.5, "solarize", 2, 0.0, "invert", 3), (0.2, "equalize", 0, 0.6, "autocontrast", 0),
    (0.2, "equalize", 8, 0.6, "equalize", 4), (0.9, "color", 9, 0.6, "equalize", 6),
    (0.8, "autocontrast", 4, 0.2, "solarize", 8), (0.1, "brightness", 3, 0.7, "color", 0),
    (0.4, "solarize", 5, 0.9, "autocontrast", 3), (0.9, "translateY", 9, 0.7, "translateY", 9),
    (0.9, "autocontrast", 2, 0.8, "solarize", 3), (0.8, "equalize", 8, 0.1, "invert", 3),
    (0.7, "translateY", 9, 0.9, "autocontrast", 1),
)
_FILL = 128 / 255    # AutoAugment's grey fill for pixels moved in from outside


def apply_op(name: str, x: Tensor, magnitude: Tensor, sign: Tensor) -> Tensor:
    """One AutoAugment operation on float [0, 1] images, result back on the 8-bit grid."""
    if name in GEOMETRIC_OPS:
        mat = _geometric_matrix(name, magnitude, sign, (x.shape[-2], x.shape[-1]))
        return _q(affine_warp(x, mat, _FILL))
    return _q(_colour_op(name, x, magnitude, sign))


def autoaugment_cifar10(x: Tensor, index: Tensor, epoch: int, seed: int) -> Tensor:
    """AutoAugment's CIFAR-10 policy, batched: sub-policy, coin flips and signs per (seed, epoch, index)."""
    x = x.clone()
    n_pol = len(CIFAR10_POLICY)
    policy = (uniform(index, seed, epoch, 1) * n_pol).long().clamp_max(n_pol - 1)
    for slot in range(2):
        coin = uniform(index, seed, epoch, 2 + 2 * slot)
        sign = torch.where(uniform(index, seed, epoch, 3 + 2 * slot) < 0.5, -1.0, 1.0)
        for k, sub in enumerate(CIFAR10_POLICY):
            prob, name, level = sub[3 * slot: 3 * slot + 3]
            rows = ((policy == k) & (coin < prob)).nonzero().flatten()
            if rows.numel():
                mag = torch.full((rows.numel(),), MAGNITUDES[name][level], device=x.device)
                x[rows] = apply_op(name, x[rows], mag, sign[rows])
    return x


def cutout(images: Tensor, cy: Tensor, cx: Tensor, length: int) -> Tensor:
    """Zero a length x length square centred at (cy, cx) per sample, clipped at the borders."""
    h, w = images.shape[-2:]
    rows = torch.arange(h, device=images.device).view(1, h, 1)
    cols = torch.arange(w, device=images.device).view(1, 1, w)
    y0, x0 = (cy - length // 2).view(-1, 1, 1), (cx - length // 2).view(-1, 1, 1)
    hole = (rows >= y0) & (rows < y0 + length) & (cols >= x0) & (cols < x0 + length)
    return images * (~hole).unsqueeze(1).to(images.dtype)


def strong_view(images_uint8: Tensor, index: Tensor, epoch: int, seed: int, padding: int = 4,
                flip: bool = True, autoaugment: bool = True, cutout_length: int | None = None) -> Tensor:
    """Strong view in [0, 1]: its own crop/flip, AutoAugment (CIFAR-10 policy), Cutout(side / 2)."""
    params = crop_flip_params(index, epoch, seed + _STRONG_SEED_OFFSET, padding, flip, device=images_uint8.device)
    x = to_float(apply_crop_flip(images_uint8, params["dx"], params["dy"], params["flip"], padding))
    index = index.to(x.device)
    if autoaugment:
        x = autoaugment_cifar10(x, index, epoch, seed)
    length = cutout_length if cutout_length is not None else x.shape[-1] // 2
    if length > 0:
        h, w = x.shape[-2:]
        cy = (uniform(index, seed, epoch, 91) * h).long()
        cx = (uniform(index, seed, epoch, 92) * w).long()
        x = cutout(x, cy, cx, length)
    return x


# --------------------------------------------------------------------------------------------
# The training module
# --------------------------------------------------------------------------------------------


class MDCS(Distiller):
    """Multi-expert long-tailed training with diversity loss and consistency self-distillation.

    `lambdas` set each expert's prior power (all zeros = plain CE experts); `cs_weight` = 0 turns
    CS off; `two_views` = False trains on the weak view only (then CS must be off).
    """

    def __init__(self, net: MultiExpertResNet, class_counts: Sequence[int], train_images: Tensor,
                 mean: Sequence[float], std: Sequence[float], seed: int = 0, lambdas: Sequence[float] = DEFAULT_LAMBDAS,
                 cs_weight: float = 0.6, cs_ramp_epochs: float = 20.0, temperature: float = 1.0,
                 two_views: bool = True, weak_rotation: float = 15.0, autoaugment: bool = True,
                 cutout_length: int | None = None, crop_padding: int = 4, flip: bool = True) -> None:
        super().__init__(net, None, [])
        if len(lambdas) != net.num_experts:
            raise KdforgeError(f"MDCS: {len(lambdas)} lambdas for {net.num_experts} experts; give one per expert")
        if cs_weight < 0 or temperature <= 0:
            raise KdforgeError(f"MDCS: need cs_weight >= 0 and temperature > 0, got {cs_weight}, {temperature}")
        if cs_weight > 0 and not two_views:
            raise KdforgeError("MDCS: consistency self-distillation (cs_weight > 0) needs two_views=true")
        counts = torch.as_tensor(list(class_counts), dtype=torch.float32)
        if counts.dim() != 1 or bool((counts < 1).any()):
            raise KdforgeError("MDCS: every class needs at least one training sample (the prior log n)")
        self.register_buffer("class_counts", counts)
        self.lambdas = [float(v) for v in lambdas]
        self.cs_weight, self.cs_ramp_epochs, self.temperature = float(cs_weight), float(cs_ramp_epochs), temperature
        self.two_views, self.weak_rotation = two_views, float(weak_rotation)
        self.autoaugment, self.cutout_length = bool(autoaugment), cutout_length
        self.crop_padding, self.flip, self.seed = int(crop_padding), bool(flip), int(seed)
        self.mean, self.std = tuple(mean), tuple(std)
        self._train_images = train_images          # raw uint8, not a buffer: never checkpointed
        self._device_images: Tensor | None = None

    @classmethod
    def build_module(cls, cfg: Any, student: nn.Module, teachers: dict[str, nn.Module], terms: list[Term],
                     data: Any, num_experts: int = 3, reduce_dimension: bool = True, normed: bool = True,
                     scale: float = 30.0, **args: Any) -> MDCS:
        """Experts from the student's architecture; prior = class counts of the training split."""
        if teachers:
            raise KdforgeError("MDCS is self-distillation and uses no teacher; remove teacher/teachers")
        if cfg.terms:
            raise KdforgeError("MDCS defines its own losses; remove `terms` from the config")
        if cfg.data.augment.mixup > 0 or cfg.data.augment.cutmix > 0:
            raise KdforgeError("MDCS needs hard labels (confident-instance mask); set mixup and cutmix to 0")
        train = data.train
        net = MultiExpertResNet(student, train.num_classes, num_experts, reduce_dimension, normed, scale)
        counts = torch.bincount(train.labels, minlength=train.num_classes).tolist()
        return cls(net, counts, train.images, train.mean, train.std, seed=cfg.trainer.seed,
                   crop_padding=cfg.data.augment.crop_padding, flip=cfg.data.augment.flip, **args)

    def eval_model(self) -> nn.Module:
        """Mean of the experts' raw logits (a fresh wrapper: no duplicated checkpoint keys)."""
        return ExpertAverage(self.student)

    def _raw_images(self, index: Tensor, device: torch.device) -> Tensor:
        if self._train_images.device != device:
            if self._device_images is None or self._device_images.device != device:
                self._device_images = self._train_images.to(device)
            return self._device_images[index.to(device)]
        return self._train_images[index.to(device)]

    def views(self, batch: Batch) -> Tensor:
        """(2B or B, C, H, W) normalised inputs: weak views (rotated trainer batch), then strong ones."""
        weak = batch.images
        if self.weak_rotation > 0:
            idx = batch.index.to(weak.device)
            angles = (uniform(idx, self.seed, batch.epoch, 0) * 2 - 1) * self.weak_rotation
            black = normalize(torch.zeros(1, weak.shape[1], 1, 1, device=weak.device), self.mean, self.std)
            weak = affine_warp(weak, rotation_matrices(angles), black.flatten())
        if not self.two_views:
            return weak
        raw = self._raw_images(batch.index, weak.device)
        strong = strong_view(raw, batch.index, batch.epoch, self.seed, self.crop_padding, self.flip,
                             self.autoaugment, self.cutout_length)
        strong = normalize(strong, self.mean, self.std).to(weak.dtype)
        if weak.is_contiguous(memory_format=torch.channels_last):
            strong = strong.contiguous(memory_format=torch.channels_last)
        return torch.cat([weak, strong])

    def forward(self, batch: Batch) -> Step:
        if not self.is_setup:
            raise KdforgeError("Distiller.setup(sample_images, num_samples) must run before training")
        if batch.soft_target is not None:
            raise KdforgeError("MDCS needs hard labels; disable mixup/cutmix")
        b = batch.target.shape[0]
        logits = self.student(self.views(batch)).float()
        counts = self.class_counts
        if self.two_views:
            dl, cs, confident = mdcs_losses(logits, batch.target, counts, self.lambdas, self.temperature)
        else:
            dl = diversity_loss(logits, batch.target, counts, self.lambdas)
            cs, confident = logits.new_zeros(()), logits.new_zeros(len(self.lambdas))
        losses = {"diversity": dl}
        groups = {"diversity": "task"}
        if self.cs_weight > 0:
            losses["consistency"] = self.cs_weight * cs_ramp(batch.epoch, self.cs_ramp_epochs) * cs
            groups["consistency"] = "distill"
        extras = {"confident_fraction": confident.detach()}
        return Step(outputs=logits[:b].mean(dim=1).detach(), losses=losses, groups=groups, extras=extras)


METHODS.register("mdcs", MDCS, family="long-tail",
                 paper="MDCS: More Diverse Experts with Consistency Self-distillation for Long-tailed Recognition "
                       "(ICCV 2023)",
                 summary="3 experts with prior-shifted CE (lam -0.5/1/2.5) + weak->strong KL on confident samples")
