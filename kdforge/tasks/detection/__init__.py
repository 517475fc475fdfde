"""Object detection (issue 13, in progress): box geometry and NMS, COCO-format data, COCO metrics.

Built so far: `boxes` (conversions, pairwise IoU, batched NMS in plain torch), `coco` (COCO JSON
in and out, validated: a bad annotation fails naming the file, the image id and the field, or is
dropped by a documented, counted rule), `metrics` (COCO AP via pycocotools, the `detection`
extra) and `scenes` (seeded procedural scenes as COCO data, noisy boxes, class-incremental
splits), `augment` (batched, seeded, box-aware resize + crop/pad + flip) and `fcos` (a dense
one-stage detector: FPN + shared head with raw per-level outputs, FCOS assignment, focal + GIoU +
centerness losses, decoding with batched NMS) and `task` (the detection Task on the one Trainer:
COCO AP after training, predictions.png; `method: detector` recipes in configs/detection/, BCKD in
kdforge/methods/bckd.py). Still to come: COCO image folders as training data, the two-stage
(RoIAlign) and query (Hungarian) detectors, and UniKD, SSD-Det and incremental-detection KD.
"""
