"""Object detection on the one Trainer: data, detectors, COCO metrics and the pieces methods share.

`boxes` (conversions, IoU, batched NMS in plain torch), `coco` (COCO JSON in and out, validated:
a bad annotation fails naming the file, the image id and the field, or is dropped by a counted
rule), `images` (a user's COCO JSON + image folder, letterboxed), `scenes` (seeded procedural
scenes as COCO data, noisy boxes, class-incremental splits), `augment` (batched, seeded,
box-aware resize + crop/pad + flip), `metrics` (COCO AP via pycocotools, the `detection` extra),
`roi` (RoIAlign via grid_sample), `fpn` (tap probing, the top-down pathway), the detectors behind
one interface (`models`: `fcos` dense one-stage, `two_stage` RPN + RoI head, `query` DETR-style
with Hungarian matching) and `task` (the detection Task: COCO AP after training,
predictions.png). Methods on it: bckd, unikd, ssd_det, iod_wcbc (kdforge/methods/).
"""
