"""SSD-Det (Wu et al., ICCV 2023): spatial self-distillation for detection trained on inaccurate boxes.

One detector (any `model.kind`; the paper's is Faster R-CNN, the default here the FCOS-style head)
and a refiner that shares its backbone. Per training batch, each noisy box b* (all the data
holds) becomes a bag of proposals and the refiner distils a better box out of it (card p01):

    Stage I   B0 = neighbourhood bag of b* (5 x 5 scales x 5 shifts = 125, valid by IoF with the image)
              SPSD: d = fc_spsd1(2fc(RoIAlign(B0))), L1(d, encode(B0, b*)); B1 = decode(B0, d).detach()
              MIL:  F1 = 2fc(RoIAlign(B1)), bag = sum_P softmax_C(fc_cls) * softmax_P(fc_ins), BCE(bag, c)
              b1 = top-7 weighted mean of B1 (weights (S_cls * S_ins)[c])
    Stage II  SPSD: d2 = fc_reg(F1), L1(d2, encode(B1, b1)) x bag conf; B2 = decode(B1, d2).detach()
              MIL:  F2 = 2fc'(RoIAlign(B2)), sigmoid classes, gfocal bag loss x stage-I conf;
                    random background boxes (IoU < 0.3 with every b*) pushed to 0
              SISD: G = 2fc''(RoIAlign(B2)) (own fcs), G += mean_P(G) (ORE), u = fc_iou(G),
                    SmoothL1(u, (IoU(B2, b1) - 0.5) / 0.5); score = S_cls[c] * minmax_P(0.5 u + 0.5)
              b_final = top-7 weighted mean of B2
    Detector  its own loss on b_final.detach(), weight `det_weight`; inference = the detector only.

`ssd.refiner` picks the arm: `none` (the detector on the noisy boxes, the paper's baseline), `mil`
(two MIL stages on hand-crafted bags, stage II re-sampled around b1: OA-MIL / P2B-like), `spsd`
(+ the regression bags) and `ssd` (+ SISD, the method). `ssd.detector_targets: noisy` is a control:
the refiner still trains on the shared backbone, the detector keeps the noisy boxes (separates the
refined boxes' effect from the refiner's effect on the shared features). The clean boxes are only read after
training, for `refined_miou` (mean IoU of the refined training boxes, un-augmented images, against
the clean ones) and `noisy_miou`; no loss ever sees them.

Recipe (`configs/methods/ssd_det.yaml`; `kdforge train configs/methods/ssd_det.yaml --out runs/ssd`):
the `detector` schema (data, model, train, augment, seed) plus `noise` {ratio, seed} (training
boxes jittered by `scenes.noisy_boxes`; ratio 0 = the clean reference) and `ssd` (refiner options).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdforge.config import OptimConfig, ScheduleConfig
from kdforge.distill.distiller import Step
from kdforge.errors import ConfigError, KdforgeError
from kdforge.losses.ssd_det import (
    DEFAULT_SCALES,
    DEFAULT_STDS,
    decode_deltas,
    encode_deltas,
    masked_mean,
    merge_topk,
    mil_bag_scores,
    mil_bce_loss,
    mil_gfocal_loss,
    minmax,
    negative_gfocal_loss,
    neighbourhood_bags,
    random_negatives,
    sisd_loss,
    sisd_target,
    spsd_l1,
)
from kdforge.methods.detector import AugmentSpec, DetectorModelConfig, SceneDataConfig, make_detector
from kdforge.models.taps import FeatureTap
from kdforge.registry import METHODS
from kdforge.tasks.base import seeded_generator
from kdforge.tasks.common import LoopConfig
from kdforge.tasks.detection.boxes import box_iou
from kdforge.tasks.detection.roi import roi_align
from kdforge.tasks.detection.task import (
    MEAN,
    STD,
    DetectionBatch,
    DetectionData,
    DetectionTask,
    DetectorModule,
    _first_tensor,
)
from kdforge.train.stages import loop_settings, parse_recipe, run_stage

__all__ = ["REFINERS", "SSDArgs", "SSDDetModule", "SSDDetRecipe", "SSDDetTask", "SSDRefiner", "build_noisy_detection",
           "run_ssd_det"]

REFINERS = ("none", "mil", "spsd", "ssd")


@dataclass
class SSDArgs:
    refiner: str = "ssd"             # none | mil | spsd | ssd (see the module docstring)
    tap: str = "feat2"               # backbone feature the refiner's RoIAlign reads (shared backbone)
    width: int = 32                  # channels of the refiner's lateral 1x1 conv on that feature
    roi_size: int = 7
    sampling_ratio: int = 1          # RoIAlign samples per bin side (mmdet's adaptive 0 gives 1-2 at these sizes)
    fc_dim: int = 128                # width of each 2fc trunk
    scales: list[float] = field(default_factory=lambda: list(DEFAULT_SCALES))
    shift: float = 0.2
    min_iof: float = 0.7             # a proposal is valid when IoF(proposal, image) > min_iof
    top_k: int = 7
    stds: list[float] = field(default_factory=lambda: list(DEFAULT_STDS))
    num_neg: int = 32                # random background boxes per image (official 500)
    neg_iou: float = 0.3
    w_spsd1: float = 0.25
    w_mil1: float = 0.25
    w_spsd2: float = 0.25
    w_mil2: float = 0.25
    w_neg: float = 0.75              # times the mean stage-I bag confidence
    w_sisd: float = 5.0              # official code (the paper's Eq. 1 says 0.25)
    det_weight: float = 4.0          # the detector's loss weight (paper alpha_3)
    detector_targets: str = "refined"  # refined | noisy (control: the refiner trains on the shared backbone,
                                       # but the detector still learns from the noisy boxes)


@dataclass
class NoiseSpec:
    ratio: float = 0.4               # centre and size jitter, fraction of the box size (SSD-Det protocol)
    seed: int = 0


@dataclass
class SSDDetRecipe:
    method: str = "ssd_det"
    seed: int = 0
    data: SceneDataConfig = field(default_factory=SceneDataConfig)
    noise: NoiseSpec = field(default_factory=NoiseSpec)
    model: DetectorModelConfig = field(default_factory=DetectorModelConfig)
    train: LoopConfig = field(default_factory=lambda: LoopConfig(
        epochs=10, batch_size=16, optim=OptimConfig(name="adamw", lr=2e-3, weight_decay=1e-4),
        schedule=ScheduleConfig(name="cosine", warmup_epochs=0.5)))
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    ssd: SSDArgs = field(default_factory=SSDArgs)

    def check(self, source: str) -> None:
        a = self.ssd
        problems = [
            (a.refiner in REFINERS, f"ssd.refiner must be one of {', '.join(REFINERS)}, got {a.refiner!r}"),
            (0 <= self.noise.ratio < 1, f"noise.ratio must be in [0, 1), got {self.noise.ratio}"),
            (len(a.scales) >= 1 and min(a.scales) > 0, "ssd.scales must be positive numbers"),
            (len(a.stds) == 4 and min(a.stds) > 0, "ssd.stds must be 4 positive numbers"),
            (a.top_k >= 1 and a.roi_size >= 1 and a.fc_dim >= 1 and a.width >= 1,
             "ssd.top_k, roi_size, fc_dim and width must be >= 1"),
            (a.num_neg >= 0, "ssd.num_neg must be >= 0"),
            (0 <= a.min_iof <= 1, "ssd.min_iof must be in [0, 1]"),
            (a.detector_targets in ("refined", "noisy"),
             f"ssd.detector_targets must be refined or noisy, got {a.detector_targets!r}"),
            (min(a.w_spsd1, a.w_mil1, a.w_spsd2, a.w_mil2, a.w_neg, a.w_sisd, a.det_weight) >= 0,
             "ssd loss weights must be >= 0"),
            (len(self.augment.scale_range) == 2, "augment.scale_range must be [low, high]"),
        ]
        for ok, message in problems:
            if not ok:
                raise ConfigError(f"{source}: {message}")


def _two_fc(n_in: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(1), nn.Linear(n_in, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU())


class SSDRefiner(nn.Module):
    """The refiner heads the method owns: lateral conv, stage-I trunk (SPSD-I, MIL-I, SPSD-II fcs),
    stage-II trunk (MIL-II fcs) and the SISD trunk with its own fcs (never shared, card ablation)."""

    def __init__(self, in_channels: int, stride: int, num_classes: int, args: SSDArgs) -> None:
        super().__init__()
        self.args, self.stride, self.num_classes = args, stride, num_classes
        self.use_spsd, self.use_sisd = args.refiner in ("spsd", "ssd"), args.refiner == "ssd"
        self.lateral = nn.Sequential(nn.Conv2d(in_channels, args.width, 1), nn.ReLU())
        n_in, d = args.width * args.roi_size ** 2, args.fc_dim
        self.trunk1, self.cls1, self.ins1 = _two_fc(n_in, d), nn.Linear(d, num_classes), nn.Linear(d, num_classes)
        self.trunk2, self.cls2, self.ins2 = _two_fc(n_in, d), nn.Linear(d, num_classes), nn.Linear(d, num_classes)
        if self.use_spsd:
            self.spsd1, self.reg2 = nn.Linear(d, 4), nn.Linear(d, 4)
            for fc in (self.spsd1, self.reg2):          # start as the identity map on the bag
                nn.init.normal_(fc.weight, std=0.001)
                nn.init.zeros_(fc.bias)
        if self.use_sisd:
            self.trunk_iou, self.fc_iou = _two_fc(n_in, d), nn.Linear(d, 1)

    def _pool(self, feat: Tensor, boxes: Tensor, image: Tensor) -> Tensor:
        """(R, width * roi^2) RoIAlign features of flat boxes (R, 4) of images `image` (R,)."""
        rois = torch.cat([image[:, None].to(boxes.dtype), boxes], 1)
        return roi_align(feat, rois, self.args.roi_size, 1.0 / self.stride, self.args.sampling_ratio).flatten(1)

    def _bag(self, trunk: nn.Module, feat: Tensor, bags: Tensor, image: Tensor, pooled: Tensor | None = None) -> Tensor:
        """(G, P, fc_dim) trunk features of (G, P, 4) bags (`pooled`: their RoIAlign features, if computed)."""
        g, p = bags.shape[:2]
        if pooled is None:
            pooled = self._pool(feat, bags.reshape(-1, 4), image.repeat_interleave(p))
        return trunk(pooled).reshape(g, p, -1)

    def forward(self, features: Tensor, boxes: list[Tensor], labels: list[Tensor], size: tuple[int, int],
                generator: torch.Generator | None = None) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Refined boxes (per image, detached) and the refiner's weighted losses (empty if no object)."""
        a, (h, w) = self.args, size
        feat = self.lateral(features)
        counts = [len(b) for b in boxes]
        noisy = torch.cat([b.reshape(-1, 4) for b in boxes]).to(feat.dtype)
        if len(noisy) == 0:
            return [b.detach() for b in boxes], {}
        label = torch.cat(labels).to(feat.device)
        image = torch.cat([torch.full((n,), i, dtype=torch.long, device=feat.device) for i, n in enumerate(counts)])
        rows = torch.arange(len(noisy), device=feat.device)
        losses: dict[str, Tensor] = {}
        # ---- stage I: (SPSD regression bag) + MIL over classes x over the bag
        bag0, valid = neighbourhood_bags(noisy, h, w, a.scales, a.shift, a.min_iof)
        if self.use_spsd:
            d = self.spsd1(self._bag(self.trunk1, feat, bag0, image))
            losses["spsd1"] = a.w_spsd1 * spsd_l1(d, encode_deltas(bag0, noisy[:, None].expand_as(bag0), a.stds),
                                                  valid)
            bag1 = decode_deltas(bag0, d, a.stds, (h, w)).detach()
        else:
            bag1 = bag0
        f1 = self._bag(self.trunk1, feat, bag1, image)
        cls, ins, bag = mil_bag_scores(self.cls1(f1), self.ins1(f1), valid, "softmax")
        losses["mil1"] = a.w_mil1 * mil_bce_loss(bag, label, valid)
        weight1 = (cls * ins)[rows, :, label].detach()                      # (G, P)
        conf1 = weight1.sum(1)                                              # the bag's confidence in class c
        box1 = merge_topk(bag1, weight1, a.top_k, (h, w))
        # ---- stage II: regression bag from stage I (or a fresh hand-crafted one), sigmoid MIL
        if self.use_spsd:
            d2 = self.reg2(f1)
            losses["spsd2"] = a.w_spsd2 * spsd_l1(d2, encode_deltas(bag1, box1[:, None].expand_as(bag1), a.stds),
                                                  valid, conf1)
            bag2, valid2 = decode_deltas(bag1, d2, a.stds, (h, w)).detach(), valid
        else:
            bag2, valid2 = neighbourhood_bags(box1, h, w, a.scales, a.shift, a.min_iof)
        pooled2 = self._pool(feat, bag2.reshape(-1, 4), image.repeat_interleave(bag2.shape[1]))
        f2 = self._bag(self.trunk2, feat, bag2, image, pooled2)
        cls2, ins2, bag_2 = mil_bag_scores(self.cls2(f2), self.ins2(f2), valid2, "sigmoid")
        losses["mil2"] = a.w_mil2 * mil_gfocal_loss(bag_2, label, valid2, conf1)
        if a.num_neg and a.w_neg and self.training:
            negs, keep = [], []
            for i in range(len(counts)):
                nb, k = random_negatives(a.num_neg, h, w, noisy[image == i], a.neg_iou, generator)
                negs.append(nb)
                keep.append(k)
            neg_image = torch.arange(len(counts), device=feat.device).repeat_interleave(a.num_neg)
            f_neg = self.trunk2(self._pool(feat, torch.cat(negs).to(feat.dtype), neg_image))
            losses["neg"] = a.w_neg * conf1.mean() * negative_gfocal_loss(self.cls2(f_neg).sigmoid(), torch.cat(keep))
        if self.use_sisd:
            gf = self._bag(self.trunk_iou, feat, bag2, image, pooled2)      # same RoIs, its own fcs
            gf = gf + masked_mean(gf, valid2)[:, None]                     # ORE: add the bag-mean feature
            u = self.fc_iou(gf)[..., 0]
            losses["sisd"] = a.w_sisd * sisd_loss(u, sisd_target(bag2, box1), valid2)
            score = cls2[rows, :, label].detach() * minmax(0.5 * u.detach() + 0.5, valid2)
        else:
            score = (cls2 * ins2)[rows, :, label].detach()
        final = merge_topk(bag2, score * valid2, a.top_k, (h, w))
        return list(final.detach().split(counts)), losses


class SSDDetModule(DetectorModule):
    """The detector plus the refiner on its backbone; the detector learns from the refined boxes."""

    def __init__(self, detector: nn.Module, num_classes: int, size: int, args: SSDArgs, seed: int = 0) -> None:
        super().__init__(detector)
        self.args, self.size, self.seed = args, size, seed
        self.refiner: SSDRefiner | None = None
        self.register_buffer("refine_calls", torch.zeros((), dtype=torch.long))
        if args.refiner != "none":
            backbone = getattr(detector, "backbone", None)
            if backbone is None:
                raise ConfigError("ssd_det: the detector exposes no `backbone` for the refiner to share")
            self._tap = FeatureTap(backbone, [args.tap])
            with torch.no_grad():
                was = backbone.training
                backbone.eval()
                backbone(torch.zeros(1, 3, size, size))
                backbone.train(was)
            probe = self._tap.features[args.tap]
            self.refiner = SSDRefiner(probe.shape[1], size // probe.shape[-1], num_classes, args)

    def refine(self, boxes: list[Tensor], labels: list[Tensor]) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Refined boxes of the last forward's images (needs the detector run on them first)."""
        if self.refiner is None:
            return [b.detach() for b in boxes], {}
        generator = None
        if self.training:
            generator = seeded_generator(self.seed, 2307, int(self.refine_calls))
            self.refine_calls += 1
        feat = self._tap.features[self.args.tap]
        size = (self.size, self.size)
        return self.refiner(feat, boxes, labels, size, generator)

    def forward(self, batch: DetectionBatch) -> Step:
        out = self.student(batch.images)
        targets, losses = self.refine(batch.boxes, batch.labels)
        if self.args.detector_targets == "noisy":
            targets = batch.boxes
        det = self.student.loss(out, targets, batch.labels)
        groups = {k: "task" for k in det}
        losses = {**{k: self.args.det_weight * v for k, v in det.items()}, **losses}
        groups.update({k: "refiner" for k in losses if k not in groups})
        return Step(outputs=_first_tensor(out).detach(), losses=losses, groups=groups)

    @torch.no_grad()
    def refined_boxes(self, data: DetectionData, device: torch.device) -> list[Tensor]:
        """The refiner's boxes for every training image (un-augmented) from its noisy boxes, eval mode."""
        was = self.training
        self.eval()
        out: list[Tensor] = []
        for start in range(0, len(data), 32):
            idx = range(start, min(start + 32, len(data)))
            x = ((data.images[start:idx[-1] + 1].float() / 255 - MEAN) / STD).to(device)
            boxes = [data.targets(i)[0].to(device) for i in idx]
            labels = [data.targets(i)[1].to(device) for i in idx]
            if self.refiner is not None:
                self.student(x)
            out += [b.cpu() for b in self.refine(boxes, labels)[0]]
        self.train(was)
        return out


def _mean_iou(a: list[Tensor], b: list[Tensor]) -> float:
    ious = [box_iou(x.float(), y.float()).diagonal() for x, y in zip(a, b) if len(x)]
    return float(torch.cat(ious).mean()) if ious else 0.0


class SSDDetTask(DetectionTask):
    """Detection on the noisy training boxes; `clean` (the same images' true boxes) only for the metric."""

    def __init__(self, *args: Any, clean: DetectionData, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clean = clean

    def result(self, module: nn.Module, env: Any, autocast: Any = None) -> dict[str, Any]:
        out = super().result(module, env, autocast)
        clean = [self.clean.targets(i)[0] for i in range(len(self.clean))]
        noisy = [t[0] for t in self._targets]
        if not all(len(c) == len(n) for c, n in zip(clean, noisy)):
            raise KdforgeError("ssd_det: noisy and clean training annotations differ in number")
        refined = module.refined_boxes(self.train, self.device) if isinstance(module, SSDDetModule) else noisy
        return {**out, "refined_miou": _mean_iou(refined, clean), "noisy_miou": _mean_iou(noisy, clean)}


def build_noisy_detection(cfg: SSDDetRecipe) -> tuple[DetectionData, DetectionData, DetectionData]:
    """(noisy training split, the same images with clean boxes, clean test split)."""
    from kdforge.methods.detector import build_detection
    from kdforge.tasks.detection.scenes import noisy_boxes

    clean, test = build_detection(cfg)
    noisy = DetectionData(clean.images, noisy_boxes(clean.coco, cfg.noise.ratio, cfg.noise.seed))
    return noisy, clean, test


def run_ssd_det(cfg: SSDDetRecipe, run_dir: str | Path, trainer: Any = None, config_text: str = "") -> dict[str, Any]:
    from kdforge.tasks.detection.metrics import require_pycocotools

    require_pycocotools()
    cfg.check("ssd_det recipe")
    noisy, clean, test = build_noisy_detection(cfg)
    torch.manual_seed(cfg.seed)
    detector = make_detector(cfg.model, cfg.data.num_classes, cfg.data.size)
    try:
        module = SSDDetModule(detector, cfg.data.num_classes, cfg.data.size, cfg.ssd, cfg.seed)
    except KdforgeError as exc:
        raise ConfigError(f"ssd_det recipe: ssd.tap: {exc}") from None
    task = SSDDetTask(detector, noisy, test, cfg.train.batch_size, cfg.seed, tuple(cfg.augment.scale_range),
                      cfg.augment.flip, module=module, clean=clean)
    return run_stage(run_dir, None, loop_settings(cfg.train, cfg.seed, trainer), task, config_text).result


class SSDDet:
    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str, run_dir: Path) -> dict[str, Any]:
        cfg, trainer, text = parse_recipe(tree, source, SSDDetRecipe, method="ssd_det")
        cfg.check(source)
        return run_ssd_det(cfg, run_dir, trainer, text)


METHODS.register(
    "ssd_det", SSDDet, family="detection",
    paper="Spatial Self-Distillation for Object Detection with Inaccurate Bounding Boxes (SSD-Det, ICCV 2023)",
    summary="noisy boxes -> proposal bags; spatial-position (regression bags) and spatial-identity (IoU) "
            "self-distillation with two-stream MIL pick refined boxes that train the detector", task="detection")
