"""Semi-supervised learning under class distribution mismatch: split, contrastive teacher task, rounds task."""

from kdforge.tasks.ssl.contrastive import (
    ContrastiveEncoder,
    ContrastiveModule,
    ContrastiveTask,
    embed,
    nt_xent_loss,
    vector_augment,
)
from kdforge.tasks.ssl.data import SSLData, gaussian_blobs, mismatch_split
from kdforge.tasks.ssl.train import RoundsTask, SSLBatch, SSLModule, known_accuracy, weighted_pseudo_ce

__all__ = [
    "ContrastiveEncoder",
    "ContrastiveModule",
    "ContrastiveTask",
    "RoundsTask",
    "SSLBatch",
    "SSLData",
    "SSLModule",
    "embed",
    "gaussian_blobs",
    "known_accuracy",
    "mismatch_split",
    "nt_xent_loss",
    "vector_augment",
    "weighted_pseudo_ce",
]
