"""Self-supervised self-distillation (DINO-style, EMA teacher) with frozen-feature k-NN / linear probe.

`SelfDistillTask` is the Task the one Trainer drives; `DINOModule` its training module (student,
EMA teacher, centre). AdaSim (`kdforge.methods.adasim`) subclasses the task to choose view 2.
"""

from kdforge.tasks.selfsup.dino import (
    DINOHead,
    DINOModule,
    DINOSpec,
    SelfDistillNet,
    ViewBatch,
    cosine_momentum,
    dino_loss,
    ema_update,
)
from kdforge.tasks.selfsup.metrics import knn_accuracy, linear_probe_accuracy
from kdforge.tasks.selfsup.task import SelfDistillTask, SSLDataConfig, SSLEvalConfig
from kdforge.tasks.selfsup.views import apply_view, crop_boxes, random_view, view_params

__all__ = [
    "DINOHead",
    "DINOModule",
    "DINOSpec",
    "SSLDataConfig",
    "SSLEvalConfig",
    "SelfDistillNet",
    "SelfDistillTask",
    "ViewBatch",
    "apply_view",
    "cosine_momentum",
    "crop_boxes",
    "dino_loss",
    "ema_update",
    "knn_accuracy",
    "linear_probe_accuracy",
    "random_view",
    "view_params",
]
