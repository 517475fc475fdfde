"""ZeroSeg's zero-shot segmentation setting: CLIP vision-encoder distillation into segment tokens.

Modules: `canvases` (64 px canvases of 2-4 shapes from the vision-language renderer, per-pixel
class and instance masks), `views` (the teacher's multi-scale grid views, encoded once and
L2-normalised), `student` (a `transformers` GroupViT vision tower + ZeroSeg's heads, optional MAE
decoder, optional pooled grouping block), `task` (the Task, its training module with the loss
switches, zero-shot labelling and the val-chosen background threshold, `draw`). The losses live in
`kdforge.losses.zeroseg`, the recipe runner in `kdforge.methods.zeroseg`.
"""
