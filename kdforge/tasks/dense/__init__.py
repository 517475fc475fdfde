"""Dense prediction (issue 15): semantic segmentation, depth, surface normals and boundaries, one or several at once.

`scenes` (a renderer-independent scene description and its rasteriser: image, semantic masks,
depth, normals, boundaries and instances from one description; `DenseData` splits), `folders` (a
user's image + mask/depth/normals/boundary PNG folders, Pillow, one-line errors), `models`
(`MultiTaskNet`: UNet or FPN encoder-decoder with one head per task, feature taps per stage and
per task output; teacher and student differ by width), `metrics` (mIoU, depth RMSE / abs-rel,
mean normal angle, boundary F / ODS-F, the multi-task score, harmonization MSE / fMSE / PSNR;
torchmetrics where it has the metric), `composites` (harmonization composites: one instance re-lit
against its real scene, and a loader for the iHarmony4 layout), `harmonize` (the harmonization
Task: a UNet on composite + mask, GiftNet's globally guided transform and real-image relation
distillation, fMSE / MSE / PSNR by foreground size), `echo` (binaural echo spectrograms
simulated from a scene's geometry, for audio-to-dense prediction), `audio` (`AudioDenseTask`: an
echo-spectrogram student taught by a frozen image teacher, with SAM blocks), `zeroseg` (ZeroSeg's
canvases, views and GroupViT student) and `task` (`DenseTask` on the one Trainer, `DenseDistiller`: the core
Distiller for dict outputs, whose terms may read several task outputs at once; `draw` writes ground
truth beside predictions).
Recipes: `method: dense` (the single-/multi-task baselines, configs/dense/), `method: mtl_cskd`,
`method: zeroseg`, `method: giftnet` and `method: sam_audio` (kdforge/methods/).
"""
