"""Self-supervised self-distillation (DINO-style, EMA teacher) with frozen-feature k-NN / linear probe."""

from kdforge.tasks.selfsup.dino import (
    DINOHead,
    DINOSpec,
    SelfDistillNet,
    dino_loss,
    ema_update,
    train_self_distillation,
)
from kdforge.tasks.selfsup.metrics import knn_accuracy, linear_probe_accuracy
from kdforge.tasks.selfsup.views import crop_boxes, random_view

__all__ = [
    "DINOHead",
    "DINOSpec",
    "SelfDistillNet",
    "crop_boxes",
    "dino_loss",
    "ema_update",
    "knn_accuracy",
    "linear_probe_accuracy",
    "random_view",
    "train_self_distillation",
]
