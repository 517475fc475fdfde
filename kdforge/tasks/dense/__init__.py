"""Dense prediction (issue 15): semantic segmentation, depth, surface normals and boundaries, one or several at once.

`scenes` (a renderer-independent scene description and its rasteriser: image, semantic masks,
depth, normals, boundaries and instances from one description; `DenseData` splits), `folders` (a
user's image + mask/depth/normals/boundary PNG folders, Pillow, one-line errors), `models`
(`MultiTaskNet`: UNet or FPN encoder-decoder with one head per task, feature taps per stage and
per task output; teacher and student differ by width), `metrics` (mIoU, depth RMSE / abs-rel,
mean normal angle, boundary F / ODS-F, the multi-task score; torchmetrics where it has the metric)
and `task` (`DenseTask` on the one Trainer, `DenseDistiller`: the core Distiller for dict outputs,
whose terms may read several task outputs at once; `draw` writes ground truth beside predictions).
Recipes: `method: mtl_cskd` (kdforge/methods/mtl_cskd.py); its `mtl_cskd.beta: 0` form is the
plain single-/multi-task baseline (configs/dense/).
"""
