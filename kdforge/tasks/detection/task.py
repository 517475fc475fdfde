"""Object detection as a Task on the one Trainer: seeded box-aware batches, a detector, COCO AP, a picture.

Data: uint8 images (N, 3, H, W) with COCO annotations (`CocoData`, image ids 1..N in order).
Batches: `stream_batch` positions, each view a pure function of (seed, epoch, position)
(`augment.view_params`). Evaluation: COCO AP / AP50 / AP75 / AP-small/medium/large from
pycocotools on the test split, after training (no selection on the test split). The module is a
`TaskModule` around the detector; its `forward(batch)` returns the detector's losses as task terms
and the raw outputs, so distillation terms can read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdforge.distill.distiller import Step
from kdforge.tasks.base import SampledTask, TaskModule
from kdforge.tasks.detection.augment import augment_batch, view_params
from kdforge.tasks.detection.boxes import xywh_to_xyxy
from kdforge.tasks.detection.coco import CocoData
from kdforge.tasks.detection.metrics import coco_ap
from kdforge.train.distributed import DistEnv

__all__ = ["DetectionBatch", "DetectionData", "DetectionTask", "DetectorModule"]

MEAN, STD = 0.5, 0.25


@dataclass
class DetectionData:
    """One split: uint8 images and their COCO annotations in the images' pixel frame.

    Labels: the position of an annotation's category id in `category_ids` (default: id - 1, the
    procedural scenes' ids 1..K). `original` and `scales` (per image): a user's data set
    letterboxed by `images.load_coco_images`; evaluation maps predictions back by 1 / scale and
    scores them against `original`, in the user's own frame.
    """

    images: Tensor
    coco: CocoData
    category_ids: list[int] | None = None
    original: CocoData | None = None
    scales: Tensor | None = None

    def __post_init__(self) -> None:
        self._by_image: dict[Any, list[dict[str, Any]]] = {}      # one pass, not one scan per image
        for a in self.coco.annotations:
            self._by_image.setdefault(a["image_id"], []).append(a)
        self._label = None if self.category_ids is None else {c: i for i, c in enumerate(self.category_ids)}

    def label_of(self, category_id: Any) -> int:
        return int(category_id) - 1 if self._label is None else self._label[category_id]

    def category_of(self, label: int) -> Any:
        return label + 1 if self.category_ids is None else self.category_ids[label]

    @property
    def num_classes(self) -> int:
        """K: labels are 0..K-1 (procedural scenes: the largest category id)."""
        if self.category_ids is not None:
            return len(self.category_ids)
        return max((int(c["id"]) for c in self.coco.categories), default=0)

    def targets(self, i: int) -> tuple[Tensor, Tensor]:
        """(xyxy boxes, labels) of image position `i`."""
        anns = self._by_image.get(self.coco.images[i]["id"], [])
        if not anns:
            return torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
        return (xywh_to_xyxy(torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)),
                torch.tensor([self.label_of(a["category_id"]) for a in anns], dtype=torch.long))

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class DetectionBatch:
    images: Tensor
    boxes: list[Tensor]
    labels: list[Tensor]
    index: Tensor


def _first_tensor(out: Any) -> Tensor:
    """A small tensor of the raw outputs for the Step's `outputs` slot (the trainer only logs it)."""
    while not isinstance(out, Tensor):
        out = next(iter(out.values())) if isinstance(out, dict) else out[0]
    return out


class DetectorModule(TaskModule):
    """The trained detector (`student`); its losses are the task group.

    Any detector of `kdforge.tasks.detection.models` (the interface: forward -> raw outputs,
    `loss(out, boxes, labels, stats)`, `decode(out)`)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.student = detector

    def eval_model(self) -> nn.Module:
        return self.student

    def forward(self, batch: DetectionBatch) -> Step:
        out = self.student(batch.images)
        losses = self.student.loss(out, batch.boxes, batch.labels)
        return Step(outputs=_first_tensor(out).detach(), losses=losses, groups={k: "task" for k in losses},
                    extras={"raw": out})


class DetectionTask(SampledTask):

    stream = 5
    name = "detection"

    def __init__(self, detector: nn.Module, train: DetectionData, test: DetectionData, batch_size: int, seed: int = 0,
                 scale_range: tuple[float, float] = (0.75, 1.25), flip: bool = True,
                 module: nn.Module | None = None, extra_result: dict[str, Any] | None = None) -> None:
        """`module`: the training module when a method adds terms (default: the detector's own losses);
        `extra_result`: entries added to result.json (e.g. the teacher's AP)."""
        self.detector, self.train, self.test, self.module = detector, train, test, module
        self.extra_result = dict(extra_result or {})
        self.batch_size, self.seed, self.scale_range, self.flip = batch_size, seed, tuple(scale_range), flip
        self.size = int(train.images.shape[-1])
        self._targets = [train.targets(i) for i in range(len(train))]

    def build(self, device: torch.device, env: DistEnv) -> nn.Module:
        self.device = device
        return (self.module or DetectorModule(self.detector)).to(device)

    def batch(self, epoch: int, step: int, env: DistEnv) -> DetectionBatch:
        idx = self.batch_index(epoch, step, env)
        params = view_params(idx, epoch, self.seed, (self.size, self.size), self.size, self.scale_range, self.flip)
        x, boxes, labels, _ = augment_batch(self.train.images[idx].float() / 255,
                                            [self._targets[i][0] for i in idx.tolist()],
                                            [self._targets[i][1] for i in idx.tolist()], params, self.size)
        return DetectionBatch(((x - MEAN) / STD).to(self.device), [b.to(self.device) for b in boxes],
                              [lb.to(self.device) for lb in labels], idx.to(self.device))

    @torch.no_grad()
    def predictions(self, module: nn.Module, data: DetectionData) -> list[dict[str, Tensor]]:
        net = module.eval_model()
        was = net.training
        net.eval()
        out: list[dict[str, Tensor]] = []
        for start in range(0, len(data), 64):
            x = (data.images[start:start + 64].float() / 255 - MEAN) / STD
            out += net.decode(net(x.to(self.device)))
        net.train(was)
        return out

    def evaluate(self, module: nn.Module, split: str, env: DistEnv, autocast: Any = None) -> dict[str, float]:
        data = {"train": self.train, "test": self.test}[split]
        detections = []
        for i, (img, det) in enumerate(zip(data.coco.images, self.predictions(module, data))):
            back = 1.0 if data.scales is None else 1.0 / float(data.scales[i])     # to the user's own frame
            for box, score, label in zip(det["boxes"].cpu().tolist(), det["scores"].cpu().tolist(),
                                         det["labels"].cpu().tolist()):
                x1, y1, x2, y2 = (v * back for v in box)
                detections.append({"image_id": img["id"], "category_id": data.category_of(int(label)),
                                   "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
        return coco_ap(data.original or data.coco, detections)

    def result(self, module: nn.Module, env: DistEnv, autocast: Any = None) -> dict[str, Any]:
        return {**{f"test_{k}": v for k, v in self.evaluate(module, "test", env).items()}, **self.extra_result}

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "detector": type(self.detector).__name__,
                "strides": getattr(self.detector, "strides", None)}

    def draw(self, module: nn.Module, path: Path) -> bool:
        """Test images with ground truth (green) and predictions above 0.3 (red, with scores)."""
        from kdforge.plotting import pyplot, save_png

        plt = pyplot()
        from matplotlib.patches import Rectangle

        count = min(8, len(self.test))
        dets = self.predictions(module, DetectionData(self.test.images[:count], self.test.coco,
                                                      self.test.category_ids))
        fig, axes = plt.subplots(2, (count + 1) // 2, figsize=(2.4 * ((count + 1) // 2), 5), squeeze=False)
        for i, ax in enumerate(axes.flat):
            ax.axis("off")
            if i >= count:
                continue
            ax.imshow(self.test.images[i].permute(1, 2, 0).numpy())
            gt, _ = self.test.targets(i)
            for x1, y1, x2, y2 in gt.tolist():
                ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, color="lime", lw=1))
            keep = dets[i]["scores"] > 0.3
            for (x1, y1, x2, y2), s in zip(dets[i]["boxes"][keep].tolist(), dets[i]["scores"][keep].tolist()):
                ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, color="red", lw=1))
                ax.text(x1, y1, f"{s:.2f}", color="red", fontsize=6)
        fig.suptitle("test: ground truth (green), predictions > 0.3 (red)", fontsize=9)
        fig.tight_layout()
        save_png(fig, path, dpi=80)
        return True

