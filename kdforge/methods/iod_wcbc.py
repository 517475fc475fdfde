"""iod_wcbc: within-/between-class KD for class-incremental detection on the query detector (card p02).

Two tasks on the same procedural scenes (`scenes.incremental_split`): the old classes
(the first `iod.old_classes` categories), then the new ones, whose images still show old objects,
unlabelled. Stages:

1. `old`: a query detector (`model`, kind query) trained on the old classes' labels only
   (`<run>/stages/old`, or `old.run: DIR` of a finished run of this recipe with `old_only`).
2. the new task in `<run>`: the student is a copy of the old model with the class head grown
   to all classes (old rows copied, new rows freshly initialised), trained on the new classes'
   labels with the frozen old model as teacher:
   (a) pseudo labels: the teacher's queries whose best old-class score > `iod.tau` join the
       targets of the student's set loss as old-class objects (the standard IOD response
       baseline; pseudo boxes overlapping a new-class box above `pseudo_drop_iou` are dropped),
   (b) DMD (`w_dmd`): the student's queries are Hungarian-matched to the teacher's
       pseudo-objects (the card's safer correspondence; query slots drift), among the ground truth
       and pseudo-objects together (the set loss's own match). Per old class c in
       the batch, P_c = mean decoder embedding of its pseudo-objects (teacher: the query that
       found it; student: its matched query) and Q_c = mean of the encoder memory inside the
       box; L = DMD(P^T, P^S) + DMD(Q^T, Q^S) (`dmd_features: false` keeps only P). Batch
       prototypes of the classes present (no EMA bank: with 3 old classes and 16 images a batch
       nearly always holds every class; a batch with < 2 classes gives 0),
   (c) IFD (`w_ifd`): `semantic_guided_feature_kd` over the matched pseudo-objects, on the
       encoder memory (the softmax over the batch's pseudo-objects).
   Arms by overrides: fine-tune (`iod.pseudo=false iod.w_dmd=0 iod.w_ifd=0`), pseudo-label
   baseline (`iod.w_dmd=0 iod.w_ifd=0`), the method (defaults), joint training
   (`iod.mode=joint`: all labels, no teacher terms, from the same grown old model and budget:
   the upper bound of the incremental step).

result.json: test AP / AP50 ... on all classes, `test_old_AP(50)` and `test_new_AP(50)` (pycocotools
on the test set restricted to the category subset, detections filtered alike),
`old_model_old_AP(50)` (the old model's old-class AP), `forgetting(50)` = old model's old AP -
student's old AP, and `test_dmd_gap`: the Frobenius norm ||D^S - D^T|| of the query-prototype
distance matrices over all test pseudo-objects (the card's sanity check: DMD should shrink it).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdforge.config import OptimConfig, ScheduleConfig, to_dict
from kdforge.distill.distiller import Step
from kdforge.errors import ConfigError, KdforgeError
from kdforge.losses.iod_wcbc import (
    box_mean,
    class_prototypes,
    distance_matrix,
    distance_matrix_kd,
    semantic_guided_feature_kd,
)
from kdforge.methods.detector import AugmentSpec, DetectorModelConfig, SceneDataConfig, build_detection, make_detector
from kdforge.registry import METHODS
from kdforge.tasks.common import LoopConfig
from kdforge.tasks.detection.boxes import box_iou
from kdforge.tasks.detection.coco import CocoData
from kdforge.tasks.detection.task import DetectionData, DetectionTask, DetectorModule
from kdforge.train.stages import loop_settings, parse_recipe, reuse_stage, run_stage

__all__ = ["IODArgs", "IODModule", "IODRecipe", "IncrementalDetectionTask", "grow_classes", "pseudo_objects",
           "run_iod_wcbc"]

MODES = ("incremental", "joint")


@dataclass
class IODArgs:
    old_classes: int = 3
    mode: str = "incremental"        # incremental | joint (all labels: the upper bound)
    pseudo: bool = True              # old-class pseudo labels from the teacher (the IOD response baseline)
    tau: float = 0.4                 # pseudo-object threshold on the teacher's best old-class score (R)
    pseudo_drop_iou: float = 0.7     # drop pseudo boxes overlapping a new-class ground-truth box above this
    w_dmd: float = 1.0               # (R) weights not recovered; the card's starting values (the recipe
    w_ifd: float = 1.0               # uses w_dmd 0.1, chosen on validation scenes: see configs/methods)
    dmd_features: bool = True        # DMD on box-pooled memory prototypes too (card: D_sem and D_feat)


@dataclass
class OldSpec:
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(
        epochs=20, batch_size=16, optim=OptimConfig(name="adamw", lr=1e-3, weight_decay=1e-4),
        schedule=ScheduleConfig(name="cosine", warmup_epochs=0.5), grad_clip=1.0))
    seed: int = 100
    run: str | None = None           # a finished old-task run (this recipe with old_only=true)


def _default_model() -> DetectorModelConfig:
    return DetectorModelConfig(kind="query", backbone_args={"width": 16}, taps=["feat2", "feat3"], width=64,
                               head={"queries": 16})


@dataclass
class IODRecipe:
    method: str = "iod_wcbc"
    seed: int = 0
    data: SceneDataConfig = field(default_factory=lambda: SceneDataConfig(num_classes=6, max_objects=3))
    model: DetectorModelConfig = field(default_factory=_default_model)
    train: LoopConfig = field(default_factory=lambda: LoopConfig(
        epochs=10, batch_size=16, optim=OptimConfig(name="adamw", lr=5e-4, weight_decay=1e-4),
        schedule=ScheduleConfig(name="cosine", warmup_epochs=0.5), grad_clip=1.0))
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    old: OldSpec = field(default_factory=OldSpec)
    old_only: bool = False
    iod: IODArgs = field(default_factory=IODArgs)

    def check(self, source: str) -> None:
        a = self.iod
        if self.model.kind != "query":
            raise ConfigError(f"{source}: model.kind must be query (DMD/IFD read decoder query embeddings), "
                              f"got {self.model.kind!r}")
        if not 0 < a.old_classes < self.data.num_classes:
            raise ConfigError(f"{source}: iod.old_classes must be in 1..{self.data.num_classes - 1}, "
                              f"got {a.old_classes}")
        if a.mode not in MODES:
            raise ConfigError(f"{source}: iod.mode must be one of {', '.join(MODES)}, got {a.mode!r}")
        if min(a.w_dmd, a.w_ifd) < 0 or not 0 < a.tau < 1 or not 0 < a.pseudo_drop_iou <= 1:
            raise ConfigError(f"{source}: need iod.w_dmd, iod.w_ifd >= 0, 0 < iod.tau < 1 and "
                              "0 < iod.pseudo_drop_iou <= 1")
        if len(self.augment.scale_range) != 2:
            raise ConfigError(f"{source}: augment.scale_range must be [low, high]")


def _old_identity(cfg: IODRecipe) -> dict[str, Any]:
    return {"data": to_dict(cfg.data), "model": to_dict(cfg.model), "old_classes": cfg.iod.old_classes,
            "old": {"seed": cfg.old.seed, "loop": to_dict(cfg.old.loop)}, "augment": to_dict(cfg.augment)}


# ------------------------------------------------------------------------------------ pieces


def grow_classes(old: torch.nn.Module, fresh: torch.nn.Module) -> torch.nn.Module:
    """`fresh` (a detector for all classes) with every weight of `old`; tensors sized by the class count
    (the class head, the backbone's unused classifier) keep `fresh`'s new rows and get the old rows copied."""
    mine = fresh.state_dict()
    state = {}
    for name, value in old.state_dict().items():
        if value.shape != mine[name].shape:
            if value.shape[1:] != mine[name].shape[1:] or value.shape[0] > mine[name].shape[0]:
                raise KdforgeError(f"iod_wcbc: cannot grow {name} from {tuple(value.shape)} to "
                                   f"{tuple(mine[name].shape)}")
            value = torch.cat([value, mine[name][value.shape[0]:]])
        state[name] = value.clone()
    fresh.load_state_dict(state)
    return fresh


@torch.no_grad()
def pseudo_objects(teacher: torch.nn.Module, t_out: dict[str, Tensor], tau: float, gt_boxes: list[Tensor],
                   drop_iou: float) -> list[dict[str, Tensor]]:
    """Per image the teacher's queries whose best class score > `tau`: pixel-xyxy `boxes`, `labels`,
    the teacher `queries`; boxes overlapping a ground-truth box of `gt_boxes` above `drop_iou` are dropped."""
    scores, labels = t_out["logits"].sigmoid().max(-1)
    boxes = teacher.pixel_boxes(t_out)
    wh = t_out["image_wh"]
    out = []
    for b in range(scores.shape[0]):
        q = (scores[b] > tau).nonzero()[:, 0]
        bx = torch.minimum(boxes[b, q].clamp_min(0), torch.cat([wh, wh]))
        if len(q) and gt_boxes[b].numel():
            keep = box_iou(bx, gt_boxes[b].float().to(bx.device)).amax(1) <= drop_iou
            q, bx = q[keep], bx[keep]
        keep = (bx[:, 2] - bx[:, 0] >= 1) & (bx[:, 3] - bx[:, 1] >= 1)      # degenerate boxes carry nothing
        q, bx = q[keep], bx[keep]
        out.append({"boxes": bx, "labels": labels[b, q], "queries": q})
    return out


def paired_instances(student: torch.nn.Module, s_out: dict[str, Tensor], t_out: dict[str, Tensor],
                     pseudo: list[dict[str, Tensor]], gt_boxes: list[Tensor] | None = None,
                     gt_labels: list[Tensor] | None = None) -> dict[str, Tensor]:
    """Teacher / student decoder embeddings of every pseudo-object, with its label, pixel box and image index.

    The student's query for a pseudo-object is its Hungarian match among all targets (the image's
    ground truth `gt_boxes` / `gt_labels`, then the pseudo-objects): the set loss's own last-layer
    match when the pseudo labels are targets, so a query that learns a new object is never pulled
    toward an old one."""
    gt_boxes = gt_boxes if gt_boxes is not None else [p["boxes"][:0] for p in pseudo]
    gt_labels = gt_labels if gt_labels is not None else [p["labels"][:0] for p in pseudo]
    matches = student.match(s_out, [torch.cat([g.float().to(p["boxes"].device), p["boxes"]])
                                    for g, p in zip(gt_boxes, pseudo)],
                            [torch.cat([g.to(p["labels"].device), p["labels"]]) for g, p in zip(gt_labels, pseudo)])
    q_t, q_s, labels, boxes, image = [], [], [], [], []
    for b, ((sq, ti), p) in enumerate(zip(matches, pseudo)):
        keep = ti >= len(gt_labels[b])
        sq, ti = sq[keep], ti[keep] - len(gt_labels[b])
        if not sq.numel():
            continue
        q_t.append(t_out["hidden"][b, p["queries"][ti]])
        q_s.append(s_out["hidden"][b, sq])
        labels.append(p["labels"][ti])
        boxes.append(p["boxes"][ti])
        image.append(torch.full((len(ti),), b, dtype=torch.long, device=sq.device))
    if not q_t:
        d = s_out["hidden"]
        return {"q_t": d.new_zeros(0, d.shape[-1]), "q_s": d.new_zeros(0, d.shape[-1]),
                "labels": torch.zeros(0, dtype=torch.long, device=d.device), "boxes": d.new_zeros(0, 4),
                "image": torch.zeros(0, dtype=torch.long, device=d.device)}
    return {"q_t": torch.cat(q_t), "q_s": torch.cat(q_s), "labels": torch.cat(labels), "boxes": torch.cat(boxes),
            "image": torch.cat(image)}


def dmd_terms(inst: dict[str, Tensor], t_mem: Tensor, s_mem: Tensor, stride: float,
              features: bool) -> Tensor:
    """DMD on the batch's class prototypes of the paired instances (query embeddings, and memory box means)."""
    classes = inst["labels"].unique()
    loss = distance_matrix_kd(class_prototypes(inst["q_t"], inst["labels"], classes),
                              class_prototypes(inst["q_s"], inst["labels"], classes))
    if features and len(classes) >= 2:
        f_t = box_mean(t_mem, inst["boxes"], inst["image"], stride)
        f_s = box_mean(s_mem, inst["boxes"], inst["image"], stride)
        loss = loss + distance_matrix_kd(class_prototypes(f_t, inst["labels"], classes),
                                         class_prototypes(f_s, inst["labels"], classes))
    return loss


class IODModule(DetectorModule):
    """The new-task student with pseudo labels, DMD and IFD from the frozen old model (not checkpointed)."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, args: IODArgs) -> None:
        super().__init__(student)
        self.args = args
        self.teachers = torch.nn.ModuleDict({"old": teacher.eval().requires_grad_(False)})

    def forward(self, batch: Any) -> Step:
        a = self.args
        out = self.student(batch.images)
        boxes, labels = list(batch.boxes), list(batch.labels)
        use_teacher = a.mode == "incremental" and (a.pseudo or a.w_dmd > 0 or a.w_ifd > 0)
        pseudo: list[dict[str, Tensor]] = []
        if use_teacher:
            teacher = self.teachers["old"]
            with torch.no_grad():
                t_out = teacher(batch.images)
            pseudo = pseudo_objects(teacher, t_out, a.tau, boxes, a.pseudo_drop_iou)
            if a.pseudo:
                boxes = [torch.cat([b.float(), p["boxes"]]) for b, p in zip(boxes, pseudo)]
                labels = [torch.cat([lb, p["labels"]]) for lb, p in zip(labels, pseudo)]
        losses = self.student.loss(out, boxes, labels)
        groups = {k: "task" for k in losses}
        if use_teacher and (a.w_dmd > 0 or a.w_ifd > 0):
            inst = paired_instances(self.student, out, t_out, pseudo, batch.boxes, batch.labels)
            stride = float(self.student.strides[0])
            if a.w_dmd > 0:
                losses["dmd"] = a.w_dmd * dmd_terms(inst, t_out["memory"], out["memory"], stride, a.dmd_features)
            if a.w_ifd > 0:
                losses["ifd"] = a.w_ifd * semantic_guided_feature_kd(inst["q_t"], inst["q_s"], t_out["memory"],
                                                                     out["memory"], inst["boxes"], inst["image"],
                                                                     stride)
            groups.update({k: "distill" for k in ("dmd", "ifd") if k in losses})
        return Step(outputs=out["logits"].detach(), losses=losses, groups=groups)


# ------------------------------------------------------------------------------------ the task


def category_subset(coco: CocoData, ids: set[int]) -> CocoData:
    """The data set restricted to the categories `ids` (annotations and categories; all images kept)."""
    return CocoData(coco.images, [a for a in coco.annotations if a["category_id"] in ids],
                    [c for c in coco.categories if c["id"] in ids], coco.source, dict(coco.dropped))


class IncrementalDetectionTask(DetectionTask):
    """Detection on the new task's labels; the result adds old / new class-subset AP, forgetting and the
    test-set DMD gap to the old model."""

    def __init__(self, *args: Any, test_all: DetectionData, old_ids: set[int], teacher: torch.nn.Module,
                 tau: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.test_all, self.old_ids, self.teacher, self.tau = test_all, set(old_ids), teacher, tau

    def result(self, module: torch.nn.Module, env: Any, autocast: Any = None) -> dict[str, Any]:
        from kdforge.tasks.detection.metrics import coco_ap

        data = self.test_all
        dets = []
        for img, det in zip(data.coco.images, self.predictions(module, data)):
            for (x1, y1, x2, y2), score, label in zip(det["boxes"].cpu().tolist(), det["scores"].cpu().tolist(),
                                                      det["labels"].cpu().tolist()):
                dets.append({"image_id": img["id"], "category_id": int(label) + 1,
                             "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
        new_ids = {c["id"] for c in data.coco.categories} - self.old_ids
        out = {f"test_{k}": v for k, v in coco_ap(data.coco, dets).items()}
        for name, ids in (("old", self.old_ids), ("new", new_ids)):
            ap = coco_ap(category_subset(data.coco, ids), [d for d in dets if d["category_id"] in ids])
            out[f"test_{name}_AP"], out[f"test_{name}_AP50"] = ap["AP"], ap["AP50"]
        out.update(self.extra_result)
        for k in ("AP", "AP50"):
            if out.get(f"old_model_old_{k}") is not None:
                out[f"forgetting{'' if k == 'AP' else '50'}"] = out[f"old_model_old_{k}"] - out[f"test_old_{k}"]
        out["test_dmd_gap"] = self.dmd_gap(module)
        return out

    @torch.no_grad()
    def dmd_gap(self, module: torch.nn.Module) -> float | None:
        """||D^S - D^T||_F of the query-prototype distance matrices over all test pseudo-objects."""
        from kdforge.tasks.detection.task import MEAN, STD

        student, teacher = module.eval_model(), self.teacher.to(self.device)
        was = student.training
        student.eval()
        teacher.eval()
        q_t, q_s, labels = [], [], []
        for start in range(0, len(self.test_all), 64):
            x = ((self.test_all.images[start:start + 64].float() / 255 - MEAN) / STD).to(self.device)
            s_out, t_out = student(x), teacher(x)
            pseudo = pseudo_objects(teacher, t_out, self.tau, [torch.zeros(0, 4)] * len(x), 1.0)
            inst = paired_instances(student, s_out, t_out, pseudo)
            q_t.append(inst["q_t"])
            q_s.append(inst["q_s"])
            labels.append(inst["labels"])
        student.train(was)
        lab = torch.cat(labels)
        classes = lab.unique()
        if len(classes) < 2:
            return None
        d_t = distance_matrix(class_prototypes(torch.cat(q_t), lab, classes))
        d_s = distance_matrix(class_prototypes(torch.cat(q_s), lab, classes))
        return float((d_s - d_t).norm())


# ------------------------------------------------------------------------------------ the recipe


def run_iod_wcbc(cfg: IODRecipe, run_dir: str | Path, trainer: Any = None, config_text: str = "") -> dict[str, Any]:
    """Old-task stage (or `old.run`), then the new task's student into `run_dir`."""
    from kdforge.tasks.detection.metrics import require_pycocotools
    from kdforge.tasks.detection.scenes import incremental_split

    require_pycocotools()
    a = cfg.iod
    train, test = build_detection(cfg)
    size, k = cfg.data.size, cfg.data.num_classes
    train_old, train_new = incremental_split(train.coco, a.old_classes)
    test_old, _ = incremental_split(test.coco, a.old_classes)
    old_ids = {c["id"] for c in test_old.categories}
    aug = (tuple(cfg.augment.scale_range), cfg.augment.flip)

    def old_task() -> DetectionTask:
        torch.manual_seed(cfg.old.seed)
        return DetectionTask(make_detector(cfg.model, a.old_classes, size), DetectionData(train.images, train_old),
                             DetectionData(test.images, test_old), cfg.old.loop.batch_size, cfg.old.seed, *aug)

    o_settings = loop_settings(cfg.old.loop, cfg.old.seed, trainer)
    if cfg.old_only:
        return run_stage(run_dir, None, o_settings, old_task(), config_text).result
    if cfg.old.run:
        stage = reuse_stage(cfg.old.run, IODRecipe, cfg, _old_identity, "iod_wcbc", "old.run", o_settings,
                            old_task(), "old_only=true")
    else:
        stage = run_stage(run_dir, "old", o_settings, old_task(), config_text)
        if stage.stopped:
            return stage.result
    old_model = stage.module.eval_model()
    torch.manual_seed(cfg.seed)
    student = grow_classes(old_model, make_detector(cfg.model, k, size))
    teacher = copy.deepcopy(old_model).eval().requires_grad_(False)
    labelled = DetectionData(train.images, train.coco if a.mode == "joint" else train_new)
    extra = {"old_model_old_AP": stage.result.get("test_AP"), "old_model_old_AP50": stage.result.get("test_AP50")}
    task = IncrementalDetectionTask(student, labelled, test, cfg.train.batch_size, cfg.seed, *aug,
                                    module=IODModule(student, teacher, a), extra_result=extra, test_all=test,
                                    old_ids=old_ids, teacher=teacher, tau=a.tau)
    return run_stage(run_dir, None, loop_settings(cfg.train, cfg.seed, trainer), task, config_text).result


class IODWCBC:
    """Registered entry: a detection task recipe (`configs/methods/iod_wcbc.yaml`)."""

    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str, run_dir: Path) -> dict[str, Any]:
        cfg, trainer, text = parse_recipe(tree, source, IODRecipe, method="iod_wcbc")
        cfg.check(source)
        return run_iod_wcbc(cfg, run_dir, trainer, text)


METHODS.register(
    "iod_wcbc", IODWCBC, family="detection",
    paper="Dynamically Semantic-Guided Knowledge Distillation for Incremental Object Detection (within-/between-"
          "class KD: DMD + IFD)",
    summary="class-incremental query detector: old-model pseudo labels + distance-matrix distillation of class "
            "prototypes + semantic-gap-weighted feature distillation in instance boxes", task="detection")
