"""COCO detection metrics from pycocotools (the maintained evaluator; we do not write our own mAP)."""

from __future__ import annotations

import contextlib
import io
from typing import Any

from kdforge.extras import require
from kdforge.tasks.detection.coco import CocoData

__all__ = ["STAT_NAMES", "coco_ap", "require_pycocotools"]

# the order of COCOeval.stats for bounding boxes
STAT_NAMES = ["AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
              "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large"]


def require_pycocotools() -> Any:
    purpose = "COCO metrics need pycocotools"
    return (require("pycocotools.coco", "detection", purpose).COCO,
            require("pycocotools.cocoeval", "detection", purpose).COCOeval)


def coco_ap(ground_truth: CocoData, detections: list[dict[str, Any]]) -> dict[str, float]:
    """AP, AP50, AP75, AP-small/medium/large (and ARs), in %, of `detections` against `ground_truth`.

    `detections`: COCO results, dicts with `image_id`, `category_id`, `bbox` [x, y, w, h], `score`.
    No detection at all scores 0 everywhere (pycocotools refuses an empty result list). Values
    pycocotools reports as -1 (no ground truth of that size) become None.
    """
    COCO, COCOeval = require_pycocotools()
    if not detections:
        return {name: 0.0 for name in STAT_NAMES}
    gt_tree = ground_truth.as_dict()
    gt_tree = {**gt_tree, "annotations": [
        {**a, "id": a.get("id", i + 1), "area": a.get("area", float(a["bbox"][2]) * float(a["bbox"][3])),
         "iscrowd": a.get("iscrowd", 0)} for i, a in enumerate(gt_tree["annotations"])]}
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        gt = COCO()
        gt.dataset = gt_tree
        gt.createIndex()
        dt = gt.loadRes([dict(d) for d in detections])
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: (None if float(v) < 0 else 100.0 * float(v)) for name, v in zip(STAT_NAMES, ev.stats)}
