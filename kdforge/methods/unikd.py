"""UniKD (Lao et al., ICCV 2023): detection KD through the query embeddings of an Adaptive Knowledge Extractor.

Why: feature-map imitation breaks down between heterogeneous detectors (a two-stage teacher and a
dense student carry different semantics in their FPN maps). UniKD moves the interface to a fixed
set of query embeddings (card p24, reconstructed from the abstract; no official code):

- AKE (`AKE`): learned queries -> L decoder layers (self-attention, cross-attention over the
  flattened multi-scale features, FFN; post-norm as DETR) -> knowledge embeddings E (B, Q, D), plus
  class (K+1, last = no object) / box (sigmoid cxcywh) heads used only in stage 1. Per-level 1x1
  adapters map a detector's FPN channels to D; the memory adds a 2-D sine position code
  (normalised image coordinates, so any stride fits) and a learned level embedding.
  DEVIATION (documented, the brief allows it): standard multi-head cross-attention over all
  positions instead of deformable attention; the reference points are not distilled (they are
  parameters of the frozen AKE, identical on both sides).
- Stage `teacher`: a detector run (any kind, default two_stage) into `<run>/stages/teacher`.
- Stage `ake`: the AKE (with the teacher-side adapters) trained on the FROZEN teacher's
  detections (after NMS, score > `ake.score_threshold`) of the same augmented views, with a
  DETR Hungarian set loss (the query detector's `hungarian_match`, scipy; cost w_cls (-p) + w_l1 L1 + w_giou
  (-GIoU); loss softmax CE with no-object weight `eos_coef` + L1 + GIoU). Its own run directory
  (`<run>/stages/ake`, a DetectionTask whose evaluation is the AKE's own detection AP). Frozen after.
- Student: L = L_det + unikd.weight * mean_{b,q} ||E_S - E_T||^2, E_T = AKE(teacher-adapters(F_T)),
  E_S = AKE(student-adapters(F_S)) through the FROZEN AKE (only the student-side adapters and the
  student learn); query i <-> query i, no matching. Student maps are resized to the teacher's
  level sizes (same number of levels required).

Arms (`unikd.mode`): `none` (no KD), `feat_mse` (the conventional baseline: per-level 1x1 adapter
from the student's FPN to the teacher's, resized, MSE, weight `unikd.feat_weight`), `unikd`.
`prepare_only: true` trains teacher + AKE (AKE in the run dir); `prepared: DIR` reuses such a run.
Embedding store: `store_only: true` writes E_T of every training view of this student recipe
(views = pure function of seed, epoch, index) to `<run>/embeddings` (safetensors per epoch +
manifest with teacher / AKE hashes and the view settings); `embeddings: <run>/embeddings` then
trains the student without running the teacher (Q x D values per view, not feature maps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.config import OptimConfig, ScheduleConfig, to_dict
from kdforge.distill.distiller import Step
from kdforge.errors import ConfigError, KdforgeError
from kdforge.methods.detector import AugmentSpec, DetectorModelConfig, SceneDataConfig, build_detection, make_detector
from kdforge.registry import METHODS
from kdforge.tasks.base import TaskModule
from kdforge.tasks.common import LoopConfig
from kdforge.tasks.detection.query import cxcywh_to_xyxy, hungarian_match, pairwise_giou
from kdforge.tasks.detection.task import DetectorModule
from kdforge.train.stages import loop_settings, parse_recipe, run_stage, shared_recipe

__all__ = ["AKE", "AKEArgs", "EmbeddingStore", "NeckFeatures", "UniKDArgs", "UniKDModule", "UniKDRecipe",
           "embedding_loss", "match_cost", "run_unikd", "set_loss", "store_identity", "write_store"]

MODES = ("none", "feat_mse", "unikd")


# ------------------------------------------------------------------------------------- recipe


@dataclass
class AKEArgs:
    queries: int = 16
    dim: int = 64
    layers: int = 2
    heads: int = 4
    ffn: int = 128
    score_threshold: float = 0.3     # teacher detections kept as stage-1 targets
    w_cls: float = 1.0               # matching cost and loss weights (DETR: 1, 5, 2; no-object 0.1)
    w_l1: float = 5.0
    w_giou: float = 2.0
    eos_coef: float = 0.1
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(
        epochs=20, batch_size=16, optim=OptimConfig(name="adamw", lr=3e-3, weight_decay=1e-4),
        schedule=ScheduleConfig(name="cosine", warmup_epochs=0.5), grad_clip=1.0))
    seed: int = 200


@dataclass
class UniKDArgs:
    mode: str = "unikd"              # none | feat_mse | unikd
    weight: float = 0.05             # lambda of mean ||E_S - E_T||^2 (sums over D = 64: ~ L_det in epoch 1)
    feat_weight: float = 0.5         # feat_mse arm (also ~ L_det in epoch 1)


@dataclass
class TeacherSpec:
    model: DetectorModelConfig = field(default_factory=lambda: DetectorModelConfig(
        kind="two_stage", backbone_args={"width": 16}, width=32))
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(
        epochs=10, batch_size=16, optim=OptimConfig(name="adamw", lr=2e-3, weight_decay=1e-4),
        schedule=ScheduleConfig(name="cosine", warmup_epochs=0.5)))
    seed: int = 100


@dataclass
class UniKDRecipe:
    method: str = "unikd"
    seed: int = 0
    data: SceneDataConfig = field(default_factory=SceneDataConfig)
    model: DetectorModelConfig = field(default_factory=DetectorModelConfig)
    train: LoopConfig = field(default_factory=lambda: LoopConfig(
        epochs=8, batch_size=16, optim=OptimConfig(name="adamw", lr=2e-3, weight_decay=1e-4),
        schedule=ScheduleConfig(name="cosine", warmup_epochs=0.5)))
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    ake: AKEArgs = field(default_factory=AKEArgs)
    unikd: UniKDArgs = field(default_factory=UniKDArgs)
    prepare_only: bool = False       # train the teacher and the AKE only (the AKE is this run's final stage)
    prepared: str | None = None      # a finished prepare_only run to reuse (its teacher and AKE)
    store_only: bool = False         # write the E_T of this student recipe's views to <run>/embeddings, then stop
    embeddings: str | None = None    # read E_T from such a store instead of running teacher + AKE online

    def check(self, source: str) -> None:
        if self.unikd.mode not in MODES:
            raise ConfigError(f"{source}: unikd.mode must be one of {', '.join(MODES)}, got {self.unikd.mode!r}")
        if self.unikd.weight < 0 or self.unikd.feat_weight < 0:
            raise ConfigError(f"{source}: unikd.weight and unikd.feat_weight must be >= 0")
        a = self.ake
        if min(a.queries, a.dim, a.layers, a.heads, a.ffn) < 1 or a.dim % a.heads or a.dim % 4:
            raise ConfigError(f"{source}: ake.queries/dim/layers/heads/ffn must be >= 1, dim a multiple of heads "
                              f"and of 4, got dim {a.dim}, heads {a.heads}")
        if not 0 <= a.score_threshold < 1 or not 0 < a.eos_coef <= 1:
            raise ConfigError(f"{source}: ake.score_threshold must be in [0, 1) and ake.eos_coef in (0, 1]")
        if len(self.augment.scale_range) != 2:
            raise ConfigError(f"{source}: augment.scale_range must be [low, high]")
        if self.embeddings and self.unikd.mode != "unikd":
            raise ConfigError(f"{source}: embeddings (stored E_T) serve unikd.mode=unikd only, got {self.unikd.mode!r}")


# ------------------------------------------------------------------------------------- pieces


class NeckFeatures:
    """A detector's FPN maps from its last forward: `out["features"]` where the detector exposes them
    (two_stage), `[out["memory"]]` (query: its encoder memory, one level), else (fcos) the inputs of its
    shared head tower, captured by a forward pre-hook. Teacher and student must give as many levels."""

    def __init__(self, detector: nn.Module) -> None:
        self.maps: list[Tensor] = []
        self.active = False
        tower = getattr(detector, "tower", None)
        self._hook = tower.register_forward_pre_hook(self._grab) if isinstance(tower, nn.Module) else None

    def _grab(self, _: nn.Module, args: tuple[Tensor, ...]) -> None:
        if self.active:
            self.maps.append(args[0])

    def run(self, detector: nn.Module, images: Tensor) -> tuple[Any, list[Tensor]]:
        """(raw outputs, FPN maps finest first) of `detector` on `images`."""
        self.maps, self.active = [], True
        try:
            out = detector(images)
        finally:
            self.active = False
        if isinstance(out, dict) and "features" in out:
            return out, list(out["features"])
        if isinstance(out, dict) and isinstance(out.get("memory"), Tensor) and out["memory"].dim() == 4:
            return out, [out["memory"]]
        if not self.maps:
            raise KdforgeError(f"unikd: cannot read the FPN maps of a {type(detector).__name__} (it exposes no "
                               "'features' output and has no head tower)")
        maps, self.maps = self.maps, []
        return out, maps

    def maps_only(self, detector: nn.Module, images: Tensor) -> list[Tensor]:
        """The FPN maps alone: through the detector's own `features(images)` where it has one (no proposals,
        no NMS: the two-stage teacher's cheap path), else a full forward."""
        if callable(getattr(detector, "features", None)):
            return list(detector.features(images))
        return self.run(detector, images)[1]


def neck_of(detector: nn.Module) -> NeckFeatures:
    """The one `NeckFeatures` of `detector` (one hook per detector, however many modules read it)."""
    neck = detector.__dict__.get("_unikd_neck")
    if neck is None:
        neck = detector.__dict__["_unikd_neck"] = NeckFeatures(detector)
    return neck


@torch.no_grad()
def neck_shapes(detector: nn.Module, size: int) -> list[tuple[int, int, int]]:
    """(C, H, W) of each FPN level of `detector` at input `size`."""
    was = detector.training
    detector.eval()
    _, maps = neck_of(detector).run(detector, torch.zeros(1, 3, size, size))
    detector.train(was)
    return [tuple(m.shape[1:]) for m in maps]          # type: ignore[misc]


def sine_points(xy: Tensor, dim: int) -> Tensor:
    """(N, dim) 2-D sine code of normalised points (N, 2) = (x, y) in [0, 1] (DETR's, temperature 10000)."""
    q = dim // 4
    freq = 10000 ** (torch.arange(q, device=xy.device, dtype=xy.dtype) / q)
    px, py = xy[:, :1] * 2 * math.pi / freq, xy[:, 1:] * 2 * math.pi / freq
    return torch.cat([py.sin(), py.cos(), px.sin(), px.cos()], 1)


def sine_position(h: int, w: int, dim: int, device: torch.device | None = None) -> Tensor:
    """(H * W, dim) sine code of a level's location centres in normalised image coordinates, row-major."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return sine_points(torch.stack([x.reshape(-1), y.reshape(-1)], 1), dim)


class DecoderLayer(nn.Module):
    """Self-attention among the queries, cross-attention to the memory, FFN; post-norm (DETR)."""

    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(), nn.Linear(ffn, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))

    def forward(self, tgt: Tensor, query_pos: Tensor, memory: Tensor, pos: Tensor) -> Tensor:
        q = tgt + query_pos
        tgt = self.norms[0](tgt + self.self_attn(q, q, tgt, need_weights=False)[0])
        tgt = self.norms[1](tgt + self.cross_attn(tgt + query_pos, memory + pos, memory, need_weights=False)[0])
        return self.norms[2](tgt + self.ffn(tgt))


class AKE(nn.Module):
    """Adaptive Knowledge Extractor: `embed(maps)` -> (B, Q, D) knowledge embeddings; `heads(E)` -> class, box."""

    def __init__(self, in_channels: list[int], num_classes: int, args: AKEArgs) -> None:
        super().__init__()
        d = args.dim
        self.dim, self.num_classes = d, num_classes
        self.adapters = adapters(in_channels, d)                    # the teacher side
        self.level = nn.Parameter(torch.randn(len(in_channels), d) * 0.02)
        self.memory_norm = nn.LayerNorm(d)
        self.content = nn.Parameter(torch.randn(args.queries, d) * 0.02)
        self.ref = nn.Parameter(torch.rand(args.queries, 2) * 0.8 + 0.1)    # reference points (normalised x, y)
        self.ref_pos = nn.Linear(d, d)
        self.layers = nn.ModuleList(DecoderLayer(d, args.heads, args.ffn) for _ in range(args.layers))
        self.cls = nn.Linear(d, num_classes + 1)
        self.box = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 4))

    def embed(self, maps: list[Tensor], side: nn.ModuleList | None = None,
              sizes: list[tuple[int, int]] | None = None) -> Tensor:
        """E (B, Q, D) from FPN `maps` through the per-level adapters `side` (default: the teacher's),
        each adapted map resized to `sizes` (the teacher's level sizes) when given."""
        side = self.adapters if side is None else side
        if len(maps) != len(side) or len(maps) != len(self.level):
            raise KdforgeError(f"unikd: the AKE reads {len(self.level)} FPN levels, got {len(maps)} maps")
        mem, pos = [], []
        for i, (conv, m) in enumerate(zip(side, maps)):
            x = conv(m)
            if sizes is not None and tuple(x.shape[-2:]) != tuple(sizes[i]):
                x = F.interpolate(x, size=sizes[i], mode="bilinear", align_corners=False)
            h, w = x.shape[-2:]
            mem.append(x.flatten(2).transpose(1, 2))
            pos.append(sine_position(h, w, self.dim, x.device) + self.level[i])
        memory, p = self.memory_norm(torch.cat(mem, 1)), torch.cat(pos, 0)[None]
        b = memory.shape[0]
        tgt = self.content[None].expand(b, -1, -1)
        qp = self.ref_pos(sine_points(self.ref.clamp(1e-3, 1 - 1e-3), self.dim))[None].expand(b, -1, -1)
        for layer in self.layers:
            tgt = layer(tgt, qp, memory, p)
        return tgt

    def heads(self, emb: Tensor) -> tuple[Tensor, Tensor]:
        """(B, Q, K+1) class logits (last: no object), (B, Q, 4) boxes as normalised cxcywh, the centre
        predicted relative to each query's reference point (in logit space, as Deformable DETR)."""
        d = self.box(emb)
        ref = torch.logit(self.ref.clamp(1e-3, 1 - 1e-3))
        return self.cls(emb), torch.cat([(d[..., :2] + ref).sigmoid(), d[..., 2:].sigmoid()], -1)


def adapters(in_channels: list[int], out: int) -> nn.ModuleList:
    """Per-level 1x1 convs from a detector's FPN channels to `out` channels."""
    return nn.ModuleList(nn.Conv2d(c, out, 1) for c in in_channels)


def embedding_loss(e_s: Tensor, e_t: Tensor) -> Tensor:
    """mean over images and queries of ||E_S[q] - E_T[q]||^2 (query i <-> query i, no matching)."""
    if e_s.shape != e_t.shape:
        raise KdforgeError(f"unikd: embeddings differ in shape, {tuple(e_s.shape)} vs {tuple(e_t.shape)}")
    return (e_s - e_t).pow(2).sum(-1).mean()


def match_cost(logits: Tensor, boxes: Tensor, t_labels: Tensor, t_boxes: Tensor, args: AKEArgs) -> Tensor:
    """(Q, G) DETR matching cost of one image: -w_cls p(label) + w_l1 L1(cxcywh) - w_giou GIoU.

    Softmax class probability (the AKE has a no-object class), unlike the query detector's focal cost;
    the assignment itself is `kdforge.tasks.detection.query.hungarian_match` (scipy)."""
    prob = logits.softmax(-1)[:, t_labels]
    l1 = torch.cdist(boxes, t_boxes, p=1)
    giou = pairwise_giou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(t_boxes))
    return -args.w_cls * prob + args.w_l1 * l1 - args.w_giou * giou


def set_loss(logits: Tensor, boxes: Tensor, targets: list[tuple[Tensor, Tensor]], args: AKEArgs
             ) -> dict[str, Tensor]:
    """Hungarian set loss over a batch: CE (no-object weight eos_coef), L1 and GIoU over the matched targets.

    `targets`: per image (labels (G,), boxes (G, 4) normalised cxcywh)."""
    b, q, k1 = logits.shape
    cls_t = torch.full((b, q), k1 - 1, dtype=torch.long, device=logits.device)
    src, tgt = [], []
    for i, (lab, box) in enumerate(targets):
        if len(lab) == 0:
            continue
        r, c = hungarian_match(match_cost(logits[i], boxes[i], lab, box, args))
        r, c = r.to(logits.device), c.to(logits.device)
        cls_t[i, r] = lab[c]
        src.append(boxes[i, r])
        tgt.append(box[c])
    weight = torch.ones(k1, device=logits.device)
    weight[-1] = args.eos_coef
    loss_cls = F.cross_entropy(logits.reshape(-1, k1), cls_t.reshape(-1), weight)
    if not src:
        zero = boxes.sum() * 0
        return {"ake_cls": args.w_cls * loss_cls, "ake_l1": zero, "ake_giou": zero}
    s, t = torch.cat(src), torch.cat(tgt)
    n = max(1, len(t))
    l1 = F.l1_loss(s, t, reduction="sum") / n
    giou = (1 - pairwise_giou(cxcywh_to_xyxy(s), cxcywh_to_xyxy(t)).diag()).sum() / n
    return {"ake_cls": args.w_cls * loss_cls, "ake_l1": args.w_l1 * l1, "ake_giou": args.w_giou * giou}


def teacher_targets(detections: list[dict[str, Tensor]], size: int, threshold: float) -> list[tuple[Tensor, Tensor]]:
    """Stage-1 targets: the teacher's detections above `threshold` as (labels, normalised cxcywh boxes)."""
    out = []
    for d in detections:
        keep = d["scores"] > threshold
        bx = d["boxes"][keep] / size
        cxcywh = torch.stack([(bx[:, 0] + bx[:, 2]) / 2, (bx[:, 1] + bx[:, 3]) / 2, bx[:, 2] - bx[:, 0],
                              bx[:, 3] - bx[:, 1]], 1) if len(bx) else bx.reshape(0, 4)
        out.append((d["labels"][keep], cxcywh))
    return out


# ------------------------------------------------------------------------------------- stage 1: the AKE


class AKEDetector(nn.Module):
    """The frozen teacher's FPN read by the AKE, as a detector (its evaluation = the AKE's own AP)."""

    def __init__(self, teacher: nn.Module, ake: AKE, size: int) -> None:
        super().__init__()
        self.teacher, self.ake, self.size = teacher, ake, size
        self.strides = getattr(teacher, "strides", None)
        self.neck = neck_of(teacher)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        _, maps = self.neck.run(self.teacher, images)
        logits, boxes = self.ake.heads(self.ake.embed(maps))
        return {"logits": logits, "boxes": boxes}

    @torch.no_grad()
    def decode(self, out: dict[str, Tensor], score_threshold: float = 0.05) -> list[dict[str, Tensor]]:
        prob = out["logits"].softmax(-1)[..., :-1]
        scores, labels = prob.max(-1)
        boxes = (cxcywh_to_xyxy(out["boxes"]) * self.size).clamp(0, self.size)
        res = []
        for s, lab, bx in zip(scores, labels, boxes):
            keep = s > score_threshold
            res.append({"boxes": bx[keep], "scores": s[keep], "labels": lab[keep]})
        return res


class AKEModule(TaskModule):
    """Stage 1: the AKE learns the frozen teacher's detections (teacher not checkpointed)."""

    def __init__(self, teacher: nn.Module, ake: AKE, args: AKEArgs, size: int) -> None:
        super().__init__()
        self.ake, self.args, self.size = ake, args, size
        self.teachers = nn.ModuleDict({"teacher": teacher.eval().requires_grad_(False)})
        self._neck = neck_of(teacher)

    def eval_model(self) -> nn.Module:
        return AKEDetector(self.teachers["teacher"], self.ake, self.size)

    def forward(self, batch: Any) -> Step:
        teacher = self.teachers["teacher"]
        with torch.no_grad():
            out, maps = self._neck.run(teacher, batch.images)
            targets = teacher_targets(teacher.decode(out), self.size, self.args.score_threshold)
        logits, boxes = self.ake.heads(self.ake.embed(maps))
        losses = set_loss(logits, boxes, targets, self.args)
        return Step(outputs=logits.detach(), losses=losses, groups={k: "task" for k in losses})


# ------------------------------------------------------------------------------------- stage 2: the student


class UniKDModule(DetectorModule):
    """The student with L_det + lambda * mean ||E_S - E_T||^2 (or the feature-MSE baseline, or nothing).

    Teacher and AKE live in `teachers` (frozen, not checkpointed); the student-side adapters train."""

    def __init__(self, student: nn.Module, teacher: nn.Module, ake: AKE, args: UniKDArgs, size: int,
                 store: Any = None) -> None:
        super().__init__(student)
        self.args, self.store, self.epoch = args, store, 0
        self.teachers = nn.ModuleDict({"teacher": teacher.eval().requires_grad_(False),
                                       "ake": ake.eval().requires_grad_(False)})
        s_shapes, t_shapes = neck_shapes(student, size), neck_shapes(teacher, size)
        if args.mode != "none" and len(s_shapes) != len(t_shapes):
            raise ConfigError(f"unikd: the student has {len(s_shapes)} FPN levels, the teacher {len(t_shapes)}; "
                              "use as many backbone taps")
        self.t_sizes = [s[1:] for s in t_shapes]
        if args.mode == "unikd":
            self.adapters = adapters([s[0] for s in s_shapes], ake.dim)
        elif args.mode == "feat_mse":
            self.adapters = nn.ModuleList(nn.Conv2d(s[0], t[0], 1) for s, t in zip(s_shapes, t_shapes))
        self._s_neck, self._t_neck = neck_of(student), neck_of(teacher)

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch                 # the view epoch of the store's keys

    def teacher_embeddings(self, batch: Any) -> Tensor:
        """E_T of the batch's views: from the embedding store when given, else the online teacher + AKE."""
        if self.store is not None:
            return self.store.lookup(self.epoch, batch.index).to(batch.images.device)
        with torch.no_grad():
            return self.teachers["ake"].embed(self._t_neck.maps_only(self.teachers["teacher"], batch.images))

    def forward(self, batch: Any) -> Step:
        out, s_maps = self._s_neck.run(self.student, batch.images)
        losses = self.student.loss(out, batch.boxes, batch.labels)
        groups = {k: "task" for k in losses}
        mode = self.args.mode
        if mode == "unikd" and self.args.weight:
            e_t = self.teacher_embeddings(batch)
            e_s = self.teachers["ake"].embed(s_maps, self.adapters, self.t_sizes)
            losses["unikd"] = self.args.weight * embedding_loss(e_s, e_t)
        elif mode == "feat_mse" and self.args.feat_weight:
            with torch.no_grad():
                t_maps = self._t_neck.maps_only(self.teachers["teacher"], batch.images)
            terms = []
            for conv, s, t in zip(self.adapters, s_maps, t_maps):
                x = conv(s)
                if x.shape[-2:] != t.shape[-2:]:
                    x = F.interpolate(x, size=t.shape[-2:], mode="bilinear", align_corners=False)
                terms.append(F.mse_loss(x, t))
            losses["feat_mse"] = self.args.feat_weight * torch.stack(terms).mean()
        groups.update({k: "distill" for k in losses if k not in groups})
        return Step(outputs=s_maps[0].detach(), losses=losses, groups=groups)


# ------------------------------------------------------------------------------------- the embedding store

STORE_FORMAT = "kdforge-unikd-embeddings/1"


def store_identity(cfg: UniKDRecipe, teacher: nn.Module, ake: AKE) -> dict[str, Any]:
    """What the stored E_T depend on: the frozen teacher and AKE (state hashes) and the student's views
    (data, augmentation, seed, batch size, epochs: each view a pure function of seed, epoch, index)."""
    from kdforge.data.cache import teacher_state_hash

    return {"format": STORE_FORMAT, "teacher_hash": teacher_state_hash(teacher), "ake_hash": teacher_state_hash(ake),
            "seed": cfg.seed, "batch_size": cfg.train.batch_size, "epochs": max(1, cfg.train.epochs),
            "data": to_dict(cfg.data), "augment": to_dict(cfg.augment)}


def write_store(cfg: UniKDRecipe, teacher: nn.Module, ake: AKE, train: Any, test: Any, out_dir: Path) -> Path:
    """E_T of every training view of the student run `cfg` describes, into `out_dir` (safetensors per epoch +
    manifest.json). Written under a temporary name, then renamed: never half-written."""
    import json
    import os
    import tempfile

    from safetensors.torch import save_file

    from kdforge.tasks.detection.task import DetectionTask
    from kdforge.train.distributed import DistEnv

    task = DetectionTask(teacher, train, test, cfg.train.batch_size, cfg.seed, tuple(cfg.augment.scale_range),
                         cfg.augment.flip)
    task.device = torch.device("cpu")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise KdforgeError(f"unikd: embedding store {out_dir} exists already")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    neck, shards = neck_of(teacher), []
    with torch.no_grad():
        for epoch in range(max(1, cfg.train.epochs)):
            rows, index = [], []
            for step in range(task.steps_per_epoch()):
                b = task.batch(epoch, step, DistEnv())
                rows.append(ake.embed(neck.maps_only(teacher, b.images)))
                index.append(b.index)
            name = f"epoch_{epoch:03d}.safetensors"
            save_file({"index": torch.cat(index).contiguous(), "embeddings": torch.cat(rows).contiguous()},
                      str(tmp / name))
            shards.append(name)
    (tmp / "manifest.json").write_text(json.dumps({**store_identity(cfg, teacher, ake), "shards": shards}, indent=1))
    os.rename(tmp, out_dir)
    return out_dir


class EmbeddingStore:
    """The stored E_T, looked up by (view epoch, sample index)."""

    def __init__(self, shards: list[tuple[dict[int, int], Tensor]]) -> None:
        self.shards = shards

    @classmethod
    def open(cls, path: str | Path, expect: dict[str, Any]) -> EmbeddingStore:
        """Load a store, refusing (one line) one written for another teacher, AKE or other views."""
        import json

        from safetensors.torch import load_file

        path = Path(path)
        try:
            manifest = json.loads((path / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"unikd recipe: embeddings {path} is not an embedding store ({exc})") from None
        diff = sorted(k for k in expect if manifest.get(k) != expect[k])
        if diff:
            raise ConfigError(f"unikd recipe: embeddings {path} were written for other settings ({', '.join(diff)})")
        shards = []
        for name in manifest["shards"]:
            try:
                t = load_file(str(path / name))
            except Exception as exc:              # a missing or truncated shard
                raise ConfigError(f"unikd recipe: embedding shard {path / name} is unreadable ({exc})") from None
            shards.append(({int(i): r for r, i in enumerate(t["index"].tolist())}, t["embeddings"]))
        return cls(shards)

    def lookup(self, epoch: int, index: Tensor) -> Tensor:
        """(B, Q, D) E_T of the views (epoch, index[b])."""
        if epoch >= len(self.shards):
            raise KdforgeError(f"unikd: the embedding store holds {len(self.shards)} epochs, asked for epoch {epoch}")
        rows, emb = self.shards[epoch]
        try:
            return emb[[rows[int(i)] for i in index.tolist()]]
        except KeyError as exc:
            raise KdforgeError(f"unikd: the embedding store has no view (epoch {epoch}, index {exc})") from None


# ------------------------------------------------------------------------------------- the recipe


def _prep_identity(cfg: UniKDRecipe) -> dict[str, Any]:
    return {"data": to_dict(cfg.data), "augment": to_dict(cfg.augment), "teacher": to_dict(cfg.teacher),
            "ake": to_dict(cfg.ake)}


def _prepare(cfg: UniKDRecipe, run_dir: Path, trainer: Any, text: str, train: Any, test: Any
             ) -> tuple[Any, Any, dict[str, Any]] | dict[str, Any]:
    """Teacher and AKE stages (or the `prepared` run's): (teacher, ake, their results), or a stopped result."""
    from kdforge.tasks.detection.task import DetectionTask

    size, k = cfg.data.size, cfg.data.num_classes
    scale, flip = tuple(cfg.augment.scale_range), cfg.augment.flip
    if cfg.prepared:
        root = Path(cfg.prepared)
        if not (root / "stages/teacher/result.json").is_file() or not (root / "result.json").is_file():
            raise ConfigError(f"unikd recipe: prepared {root} holds no finished teacher + AKE run; train it first "
                              "(prepare_only=true)")
        theirs = shared_recipe(root, UniKDRecipe, cfg, _prep_identity, "unikd", "prepared")
        if not theirs.prepare_only:
            raise ConfigError(f"unikd recipe: prepared {root} is not a prepare_only run (its final stage is a student)")
        ake_root, ake_name, quiet = root, None, True
    else:
        root, ake_root, quiet = run_dir, run_dir, False
        ake_name = None if cfg.prepare_only else "ake"

    torch.manual_seed(cfg.teacher.seed)
    t_task = DetectionTask(make_detector(cfg.teacher.model, k, size), train, test, cfg.teacher.loop.batch_size,
                           cfg.teacher.seed, scale, flip)
    t_stage = run_stage(root, "teacher", loop_settings(cfg.teacher.loop, cfg.teacher.seed, trainer), t_task,
                        text, quiet=quiet)
    if t_stage.stopped:
        return t_stage.result
    teacher = t_stage.module.eval_model().eval().requires_grad_(False)
    torch.manual_seed(cfg.ake.seed)
    ake = AKE([s[0] for s in neck_shapes(teacher, size)], k, cfg.ake)
    a_task = DetectionTask(AKEDetector(teacher, ake, size), train, test, cfg.ake.loop.batch_size, cfg.ake.seed,
                           scale, flip, module=AKEModule(teacher, ake, cfg.ake, size),
                           extra_result={"teacher_test_AP": t_stage.result.get("test_AP"),
                                         "teacher_test_AP50": t_stage.result.get("test_AP50")})
    a_stage = run_stage(ake_root, ake_name, loop_settings(cfg.ake.loop, cfg.ake.seed, trainer), a_task, text,
                        quiet=quiet)
    if a_stage.stopped:
        return a_stage.result
    results = {"teacher_test_AP": t_stage.result.get("test_AP"), "teacher_test_AP50": t_stage.result.get("test_AP50"),
               "ake_test_AP": a_stage.result.get("test_AP"), "ake_test_AP50": a_stage.result.get("test_AP50")}
    if cfg.prepare_only:
        return a_stage.result
    return teacher, a_stage.module.ake.eval().requires_grad_(False), results


def run_unikd(cfg: UniKDRecipe, run_dir: str | Path, trainer: Any = None, config_text: str = "") -> dict[str, Any]:
    """Teacher and AKE stages (or `prepared`), then the student with the chosen arm into `run_dir`."""
    from kdforge.tasks.detection.metrics import require_pycocotools
    from kdforge.tasks.detection.task import DetectionTask

    require_pycocotools()
    run_dir = Path(run_dir)
    train, test = build_detection(cfg)
    size, k = cfg.data.size, cfg.data.num_classes
    torch.manual_seed(cfg.seed)
    make_detector(cfg.model, k, size)        # a bad student model fails before anything trains
    prep = _prepare(cfg, run_dir, trainer, config_text, train, test)
    if isinstance(prep, dict):
        return prep
    teacher, ake, results = prep
    store = None
    if cfg.store_only:
        path = write_store(cfg, teacher, ake, train, test, run_dir / "embeddings")
        return {"embeddings": str(path), **results}
    if cfg.embeddings:
        store = EmbeddingStore.open(cfg.embeddings, store_identity(cfg, teacher, ake))
    torch.manual_seed(cfg.seed)
    student = make_detector(cfg.model, k, size)
    module = UniKDModule(student, teacher, ake, cfg.unikd, size, store)
    task = DetectionTask(student, train, test, cfg.train.batch_size, cfg.seed, tuple(cfg.augment.scale_range),
                    cfg.augment.flip, module=module, extra_result=results)
    return run_stage(run_dir, None, loop_settings(cfg.train, cfg.seed, trainer), task, config_text).result


class UniKD:
    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str, run_dir: Path) -> dict[str, Any]:
        cfg, trainer, text = parse_recipe(tree, source, UniKDRecipe, method="unikd")
        cfg.check(source)
        return run_unikd(cfg, run_dir, trainer, text)


METHODS.register(
    "unikd", UniKD, family="detection",
    paper="UniKD: Universal Knowledge Distillation for Mimicking Homogeneous or Heterogeneous Object Detectors "
          "(ICCV 2023)",
    summary="an Adaptive Knowledge Extractor (query decoder) pre-trained on the teacher's detections, frozen, "
            "then matched query-by-query on the student's features", task="detection")
