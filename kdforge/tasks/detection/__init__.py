"""Object detection (issue 13, in progress): box geometry and NMS, COCO-format data, COCO metrics.

Built so far: `boxes` (conversions, pairwise IoU, batched NMS in plain torch), `coco` (COCO JSON
in and out, validated: a bad annotation fails naming the file, the image id and the field, or is
dropped by a documented, counted rule), `metrics` (COCO AP via pycocotools, the `detection`
extra) and `scenes` (seeded procedural scenes as COCO data, noisy boxes, class-incremental
splits) and `augment` (batched, seeded, box-aware resize + crop/pad + flip). Still to come: the
detectors, the Task and the four methods.
"""
