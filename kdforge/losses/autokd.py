"""The parametrised distiller that Auto-KD searches: transform chain -> distance, as a registered loss.

Why: Auto-KD decomposes a distiller into (global transform, intra-spatial transform,
inter-spatial transform, distance, temperature); `AutoKDLoss` composes any such chain so the
searched distiller is a normal kdforge loss (`loss: autokd_distill` in a recipe).

Inputs are logits or pooled vectors (N, D) — transforms must then be `none` — or feature maps
(N, C, H, W). Both sides go through the same transforms (the student after its connector):

global  none | spatial_attention (channel mean of f^2 -> (N, 1, H, W)) | channel_attention
        (spatial mean of f^2 -> (N, C, 1, 1)) | mask_random (drop a random `mask_ratio` of the
        positions, same mask for both) | mask_teacher (keep the positions of highest teacher
        attention, drop `mask_ratio`)
intra   none | patches (a 2x2 grid of local patches, each compared as its own sample) |
        multiscale (average pooling to 1x1, 2x2 and 4x4, concatenated)
inter   none (one row per sample: C*L values) | channel (one row per channel: its L positions)

The distance compares the rows: mse, gl2 (MSE of L2-normalised rows), cosine (1 - cos),
pearson (1 - correlation), kl (T^2 * KL(softmax(t/T) || softmax(s/T)), i.e. Hinton KD on
logits and channel-wise distillation with `inter: channel`), cs (Cauchy-Schwarz divergence
-log(<p, q> / (||p|| ||q||)) of the softened distributions). Plain L1 is left out: the paper's
"simplify" step prunes it as consistently bad. The teacher side is always detached.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.errors import KdforgeError
from kdforge.losses._common import paired
from kdforge.losses.base import DistillLoss, Features, LossContext
from kdforge.losses.cs import cs_divergence
from kdforge.registry import LOSSES

GLOBAL = ("none", "spatial_attention", "channel_attention", "mask_random", "mask_teacher")
INTRA = ("none", "patches", "multiscale")
INTER = ("none", "channel")
DISTANCES = ("mse", "gl2", "cosine", "pearson", "kl", "cs")
SOFT_DISTANCES = ("kl", "cs")      # the ones that soften rows with a temperature
SCALES = (1, 2, 4)                 # multi-scale pooling grid sizes


# -- transforms ----------------------------------------------------------------------------------


def global_transform(name: str, s: Tensor, t: Tensor, mask_ratio: float = 0.5) -> tuple[Tensor, Tensor]:
    """Level-1 transform of (N, C, H, W) maps, applied to both sides."""
    if name == "none":
        return s, t
    if name == "spatial_attention":
        return s.pow(2).mean(1, keepdim=True), t.pow(2).mean(1, keepdim=True)
    if name == "channel_attention":
        return s.pow(2).mean((2, 3), keepdim=True), t.pow(2).mean((2, 3), keepdim=True)
    n, _, h, w = t.shape
    keep = max(1, round((1.0 - mask_ratio) * h * w))
    if name == "mask_random":
        score = torch.rand(n, h * w, device=t.device)
    elif name == "mask_teacher":
        score = t.pow(2).mean(1).reshape(n, h * w)
    else:
        raise KdforgeError(f"autokd_distill: unknown global transform '{name}'; known: {', '.join(GLOBAL)}")
    top = score.topk(keep, dim=1).indices
    mask = torch.zeros(n, h * w, device=t.device, dtype=s.dtype).scatter_(1, top, 1.0).reshape(n, 1, h, w)
    return s * mask, t * mask.to(t.dtype)


def intra_transform(name: str, x: Tensor) -> Tensor:
    """Level-2 transform: (N, C, H, W) -> (N', C, L) rows of positions."""
    n, c, h, w = x.shape
    if name == "none":
        return x.reshape(n, c, h * w)
    if name == "patches":
        if h % 2 or w % 2:
            raise KdforgeError(f"autokd_distill: 'patches' needs an even spatial size, got {h}x{w}")
        p = x.reshape(n, c, 2, h // 2, 2, w // 2).permute(0, 2, 4, 1, 3, 5)
        return p.reshape(n * 4, c, (h // 2) * (w // 2))
    if name == "multiscale":
        sizes = [k for k in SCALES if k <= min(h, w)]
        return torch.cat([F.adaptive_avg_pool2d(x, k).reshape(n, c, k * k) for k in sizes], dim=2)
    raise KdforgeError(f"autokd_distill: unknown intra-spatial transform '{name}'; known: {', '.join(INTRA)}")


def inter_transform(name: str, x: Tensor) -> Tensor:
    """Level-3 transform: (N, C, L) -> rows (R, D) the distance compares."""
    n, c, length = x.shape
    if name == "none":
        return x.reshape(n, c * length)
    if name == "channel":
        return x.reshape(n * c, length)
    raise KdforgeError(f"autokd_distill: unknown inter-spatial transform '{name}'; known: {', '.join(INTER)}")


# -- distances -----------------------------------------------------------------------------------


def _cos_rows(s: Tensor, t: Tensor) -> Tensor:
    return F.cosine_similarity(s, t, dim=1, eps=1e-8)


def _kl_rows(s: Tensor, t: Tensor, temperature: float) -> Tensor:
    log_p_s = F.log_softmax(s / temperature, dim=1)
    log_p_t = F.log_softmax(t / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1).mean() * temperature**2


def _cs_rows(s: Tensor, t: Tensor, temperature: float) -> Tensor:
    p = F.softmax(t / temperature, dim=1)
    q = F.softmax(s / temperature, dim=1)
    return cs_divergence(p, q, dim=1).mean()


_DISTANCE_FNS: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "mse": lambda s, t, T: F.mse_loss(s, t),
    "gl2": lambda s, t, T: (F.normalize(s, dim=1) - F.normalize(t, dim=1)).pow(2).sum(1).mean(),
    "cosine": lambda s, t, T: (1.0 - _cos_rows(s, t)).mean(),
    "pearson": lambda s, t, T: (1.0 - _cos_rows(s - s.mean(1, keepdim=True),
                                                t - t.mean(1, keepdim=True))).mean(),
    "kl": _kl_rows,
    "cs": _cs_rows,
}


def row_distance(name: str, s: Tensor, t: Tensor, temperature: float = 1.0) -> Tensor:
    """Distance between matching rows (R, D) of student and teacher, averaged over rows."""
    fn = _DISTANCE_FNS.get(name)
    if fn is None:
        raise KdforgeError(f"autokd_distill: unknown distance '{name}'; known: {', '.join(DISTANCES)}")
    return fn(s, t, temperature)


def autokd_distance(s: Tensor, t: Tensor, *, global_transform_name: str = "none", intra: str = "none",
                    inter: str = "none", distance: str = "mse", temperature: float = 1.0,
                    mask_ratio: float = 0.5) -> Tensor:
    """The whole chain on one student/teacher pair (teacher detached)."""
    t = t.detach()
    if s.shape != t.shape:
        raise KdforgeError(f"autokd_distill: student {tuple(s.shape)} and teacher {tuple(t.shape)} must have "
                           "the same shape (add a connector on the term)")
    if s.dim() == 2:
        if (global_transform_name, intra, inter) != ("none", "none", "none"):
            raise KdforgeError("autokd_distill: (N, D) inputs (logits, pooled) take no transforms; set "
                               "global_transform/intra/inter to none")
        return row_distance(distance, s.float(), t.float(), temperature)
    if s.dim() != 4:
        raise KdforgeError(f"autokd_distill: expects (N, D) or (N, C, H, W) inputs, got {tuple(s.shape)}")
    s, t = global_transform(global_transform_name, s.float(), t.float(), mask_ratio)
    s, t = intra_transform(intra, s), intra_transform(intra, t)
    s, t = inter_transform(inter, s), inter_transform(inter, t)
    return row_distance(distance, s, t, temperature)


class AutoKDLoss(DistillLoss):
    """`autokd_distill`: one searched transform chain + distance, summed over the term's tap pairs."""

    def __init__(self, global_transform: str = "none", intra: str = "none", inter: str = "none",
                 distance: str = "mse", temperature: float = 1.0, mask_ratio: float = 0.5) -> None:
        super().__init__()
        for value, known, what in ((global_transform, GLOBAL, "global_transform"), (intra, INTRA, "intra"),
                                   (inter, INTER, "inter"), (distance, DISTANCES, "distance")):
            if value not in known:
                raise KdforgeError(f"autokd_distill: unknown {what} '{value}'; known: {', '.join(known)}")
        if temperature <= 0:
            raise KdforgeError(f"autokd_distill: temperature must be > 0, got {temperature}")
        if not 0.0 <= mask_ratio < 1.0:
            raise KdforgeError(f"autokd_distill: mask_ratio must be in [0, 1), got {mask_ratio}")
        self.global_transform = global_transform
        self.intra, self.inter, self.distance = intra, inter, distance
        self.temperature = float(temperature)
        self.mask_ratio = float(mask_ratio)

    def forward(self, student: Features, teacher: Features | None, ctx: LossContext) -> Tensor:
        pairs = paired(student, teacher, "autokd_distill")
        values = [autokd_distance(s, t, global_transform_name=self.global_transform, intra=self.intra,
                                  inter=self.inter, distance=self.distance, temperature=self.temperature,
                                  mask_ratio=self.mask_ratio) for s, t in pairs]
        return torch.stack(values).sum()

    def extra_repr(self) -> str:
        return (f"global={self.global_transform}, intra={self.intra}, inter={self.inter}, "
                f"distance={self.distance}, T={self.temperature}")


if "autokd_distill" not in LOSSES:
    LOSSES.register("autokd_distill", AutoKDLoss, family="search",
                    paper="Li et al., Auto-KD: Automated Knowledge Distillation via Monte Carlo Tree Search "
                          "(ICCV 2023)",
                    group="distill", inputs="any")
