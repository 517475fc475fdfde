"""RDD (Li et al., ICCV 2023): representation-disparity-aware distillation for 3D object detection.

Off-the-shelf detector KD helps where teacher and student features are already alike; RDD aims the
distillation at the regions where they differ most. Per training batch (card p07):

    regions   teacher proposals (M) and student proposals (N), both kept (bilateral pairs): the top-K
              3x3 heatmap peaks with score > `score_threshold`, each decoded box's axis-aligned BEV
              extent (at least `min_region` m a side), cropped at the same metric place in both
              models' neck features: R^S = RoIAlign(psi(F_S)), R^T = RoIAlign(F_T), roi_size x roi_size
    normalise R_hat = softmax over channels of R / tau at every cell (tau 4)
    disparity d_i = || R_hat^S_i - R_hat^T_i ||_2
    inner     m* = argmin_{m in [0,1]} sum_i m_i (-d~_i) + lam ||m||_1  ->  m_i = 1[d~_i > lam],
              d~_i = d_i / mean_j d_j (no gradient; the card's reconstruction)
    L_feat    = 1/(M+N) sum_i m_i d_i
    L_logit   = 1/(M+N) sum_i m_i |p^S_i - p^T_i|_1   (heatmap probabilities in the region; L1 summed
              over classes, averaged over the region's cells)
    L         = detector loss + alpha_feat L_feat + alpha_logit L_logit

psi is a 1x1 conv + norm + ReLU from the student's to the teacher's channels. Deviations, as the card
allows: psi is applied before the channel softmax (so both sides are normalised over the same
C_t channels); the normalisation d~ and the 1/(M+N) mean are per scene and the losses are averaged
over the batch's scenes (so a batch splits over DDP ranks exactly); GroupNorm instead of BatchNorm
in psi for the same reason. `rdd.weighting: uniform` (m = 1) is the ablation without the inner
problem. Each epoch logs the fraction of active pairs and the pairs per scene (train_rdd_active,
train_rdd_pairs); after training the result holds the per-region disparity distribution on the test
scenes (`disparity_*`: adapter-free heatmap-probability disparity, comparable across arms, plus the
feature disparity through psi for a distilled student).

Recipe (`configs/methods/rdd.yaml`): the pointcloud `BEVRecipe` (data, model, teacher, teacher_only,
train, eval, seed; kdforge.tasks.pointcloud.task) plus `rdd: {alpha_feat, alpha_logit, lam, tau, top_k,
score_threshold, min_region, roi_size, weighting, cache_teacher}`. With both alphas 0 and no
`teacher.run` the recipe trains the detector alone (configs/pointcloud/student.yaml); `teacher_only:
true` trains the teacher (configs/pointcloud/teacher.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdforge.distill.distiller import Step
from kdforge.errors import ConfigError
from kdforge.losses.rdd import channel_softmax, inner_weights, rdd_losses, region_features
from kdforge.registry import METHODS
from kdforge.tasks.pointcloud.iou import bev_corners
from kdforge.tasks.pointcloud.models import BEVDetector, centerpoint_loss, decode
from kdforge.tasks.pointcloud.task import BEVBatch, BEVDetectionTask, BEVDetectorModule, BEVRecipe, run_bev
from kdforge.train.stages import parse_recipe

__all__ = ["RDDArgs", "RDDModule", "RDDRecipe", "channel_softmax", "inner_weights", "peak_regions",
           "rdd_losses", "region_features", "region_rois"]


@dataclass
class RDDArgs:
    alpha_feat: float = 0.2          # alpha_1 (paper)
    alpha_logit: float = 0.2         # alpha_2 (paper)
    lam: float = 0.1                 # lambda of the inner L1 problem (paper 0.1)
    tau: float = 4.0                 # channel-softmax temperature (paper)
    top_k: int = 100                 # proposals per model and scene (card)
    score_threshold: float = 0.1     # proposal score (card, R)
    min_region: float = 2.0          # smallest region side (m)
    roi_size: int = 3                # RoIAlign output cells per side
    weighting: str = "rdd"           # rdd (inner problem) | uniform (every pair weight 1: the ablation)
    cache_teacher: bool = True       # the teacher's outputs on the fixed training scenes, computed once


@dataclass
class RDDRecipe(BEVRecipe):
    method: str = "rdd"
    rdd: RDDArgs = field(default_factory=RDDArgs)


# ------------------------------------------------------------------------------------- pure pieces


def peak_regions(out: dict[str, Tensor], extent: float, cell: float, top_k: int, score_threshold: float,
                 min_region: float) -> list[Tensor]:
    """Per scene (n, 4) metric BEV regions (x1, y1, x2, y2): the axis-aligned extent of each decoded peak box."""
    regions = []
    for boxes, _, _ in decode(out, extent, cell, top_k, score_threshold):
        if len(boxes) == 0:
            regions.append(torch.zeros(0, 4))
            continue
        corners = bev_corners(boxes.float())
        lo, hi = corners.min(1).values, corners.max(1).values
        centre, half = (lo + hi) / 2, ((hi - lo) / 2).clamp_min(min_region / 2)
        regions.append(torch.cat([centre - half, centre + half], 1))
    return regions


def region_rois(regions: list[Tensor], extent: float) -> tuple[Tensor, Tensor]:
    """(rois (R, 5) in grid-metre coordinates (scene, x1 + E, y1 + E, x2 + E, y2 + E), scene of each pair (R,))."""
    scene = torch.cat([torch.full((len(r),), i, dtype=torch.long) for i, r in enumerate(regions)]) if regions \
        else torch.zeros(0, dtype=torch.long)
    boxes = torch.cat(regions) if regions else torch.zeros(0, 4)
    return torch.cat([scene[:, None].float(), boxes + extent], 1), scene


# ------------------------------------------------------------------------------------- module


def _adapter(c_s: int, c_t: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_s, c_t, 1, bias=False), nn.GroupNorm(max(1, c_t // 8), c_t), nn.ReLU())


class RDDModule(BEVDetectorModule):
    """Student detector + adapter psi (trained), frozen teacher; the RDD terms on bilateral region pairs."""

    def __init__(self, student: BEVDetector, teacher: BEVDetector | None, args: RDDArgs) -> None:
        super().__init__(student, teacher)
        self.args = args
        self.distilling = teacher is not None and (args.alpha_feat > 0 or args.alpha_logit > 0)
        self.adapter = _adapter(student.channels, teacher.channels) if self.distilling else None
        self.cache_teacher = args.cache_teacher

    def uses_teacher(self) -> bool:
        return self.distilling

    def forward(self, batch: BEVBatch) -> Step:
        out = self.student(batch.points, batch.batch, batch.size)
        losses = centerpoint_loss(out, batch.heat, batch.reg, batch.mask)
        groups = {k: "task" for k in losses}
        extras: dict[str, Tensor] = {}
        if self.distilling:
            t_out = self.teacher_outputs(batch)
            l_feat, l_logit, stats = self.rdd_terms(out, t_out)
            a = self.args
            if a.alpha_feat > 0:
                losses["rdd_feat"] = a.alpha_feat * l_feat
            if a.alpha_logit > 0:
                losses["rdd_logit"] = a.alpha_logit * l_logit
            groups.update({k: "distill" for k in losses if k.startswith("rdd_")})
            extras = {"rdd_active": stats["active"] * stats["pairs"], "rdd_pairs": stats["pairs"]}   # sums
        return Step(outputs=out["heatmap"].detach(), losses=losses, groups=groups, extras=extras)

    def train_metrics(self, counts: dict[str, float]) -> dict[str, float]:
        """train_rdd_active: the fraction of the epoch's pairs the inner problem kept (train_rdd_pairs: per scene)."""
        if "rdd_pairs" not in counts:
            return {}
        return {"train_rdd_active": counts.get("rdd_active", 0.0) / max(1.0, counts["rdd_pairs"])}

    def regions(self, s_out: dict[str, Tensor], t_out: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Bilateral pairs: teacher proposals then student proposals of every scene (not de-duplicated)."""
        a, st = self.args, self.student
        t_reg = peak_regions(t_out, st.extent, self.teacher.cell, a.top_k, a.score_threshold, a.min_region)
        s_reg = peak_regions({k: v.detach() for k, v in s_out.items()}, st.extent, st.cell, a.top_k,
                             a.score_threshold, a.min_region)
        rois, scene = region_rois([torch.cat([t, s]) for t, s in zip(t_reg, s_reg, strict=True)], st.extent)
        return rois.to(s_out["neck"].device), scene.to(s_out["neck"].device)

    def rdd_terms(self, s_out: dict[str, Tensor], t_out: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict]:
        a = self.args
        rois, scene = self.regions(s_out, t_out)
        return rdd_losses(self.adapter(s_out["neck"]), t_out["neck"], s_out["heatmap"].sigmoid(),
                          t_out["heatmap"].sigmoid(), rois, scene, s_out["neck"].shape[0], self.student.cell,
                          a.tau, a.lam, a.roi_size, a.weighting)

    @torch.no_grad()
    def report(self, task: BEVDetectionTask) -> dict[str, Any]:
        """Per-region disparity on the test scenes (teacher + student proposals): its distribution."""
        if self.teacher is None:
            return {}
        was = self.training
        self.eval()
        logit_d, feat_d = [], []
        a = self.args
        for start in range(0, len(task.test), 32):
            idx = list(range(start, min(start + 32, len(task.test))))
            s_out = task.outputs(self.student, task.test, idx)
            t_out = task.outputs(self.teacher, task.test, idx)
            rois, _ = self.regions(s_out, t_out)
            if len(rois) == 0:
                continue
            scale = 1.0 / self.student.cell
            q_s = region_features(s_out["heatmap"].sigmoid(), rois.cpu(), a.roi_size, scale)
            q_t = region_features(t_out["heatmap"].sigmoid(), rois.cpu(), a.roi_size, scale)
            logit_d.append((q_s - q_t).abs().sum(1).flatten(1).mean(1))
            if self.adapter is not None:
                adapted = self.adapter.cpu()(s_out["neck"])
                r_s = channel_softmax(region_features(adapted, rois.cpu(), a.roi_size, scale), a.tau)
                r_t = channel_softmax(region_features(t_out["neck"], rois.cpu(), a.roi_size, scale), a.tau)
                feat_d.append((r_s - r_t).flatten(1).norm(dim=1))
        self.to(task.device)
        self.train(was)
        out: dict[str, Any] = {}
        if logit_d:
            d = torch.cat(logit_d).double()
            q = torch.quantile(d, torch.tensor([0.5, 0.9], dtype=torch.float64)).tolist()
            out.update({"disparity_pairs": len(d), "disparity_mean": float(d.mean()), "disparity_p50": q[0],
                        "disparity_p90": q[1], "disparity_high_frac": float((d > 0.5).double().mean()),
                        "disparity_hist": torch.histc(d, bins=10, min=0, max=2).long().tolist()})
        if feat_d:
            f = torch.cat(feat_d).double()
            out.update({"feat_disparity_mean": float(f.mean()),
                        "feat_disparity_p90": float(torch.quantile(f, 0.9))})
        return out


# ------------------------------------------------------------------------------------- recipe


def check_args(a: RDDArgs, source: str) -> None:
    if a.alpha_feat < 0 or a.alpha_logit < 0 or a.lam < 0:
        raise ConfigError(f"{source}: rdd.alpha_feat, rdd.alpha_logit and rdd.lam must be >= 0, got "
                          f"{a.alpha_feat}, {a.alpha_logit}, {a.lam}")
    if a.tau <= 0 or a.top_k < 1 or a.roi_size < 1 or a.min_region <= 0:
        raise ConfigError(f"{source}: need rdd.tau > 0, rdd.top_k >= 1, rdd.roi_size >= 1 and rdd.min_region > 0")
    if not 0 <= a.score_threshold < 1:
        raise ConfigError(f"{source}: rdd.score_threshold must be in [0, 1), got {a.score_threshold}")
    if a.weighting not in ("rdd", "uniform"):
        raise ConfigError(f"{source}: rdd.weighting must be rdd or uniform, got {a.weighting!r}")


class RDD:
    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str, run_dir: Path) -> dict[str, Any]:
        cfg, trainer, text = parse_recipe(tree, source, RDDRecipe, method="rdd")
        cfg.check(source)
        check_args(cfg.rdd, source)
        distil = cfg.rdd.alpha_feat > 0 or cfg.rdd.alpha_logit > 0
        return run_bev(cfg, RDDRecipe, run_dir, trainer, text, lambda s, t: RDDModule(s, t, cfg.rdd),
                       needs_teacher=distil, method="rdd")


METHODS.register(
    "rdd", RDD, family="3d-detection",
    paper="Representation Disparity-aware Distillation for 3D Object Detection (ICCV 2023)",
    summary="bilateral teacher + student proposal regions of the BEV neck features, channel-softmax normalised; "
            "an L1 inner problem keeps the high-disparity pairs; feature + heatmap KD on them", task="pointcloud")
