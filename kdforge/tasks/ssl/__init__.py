"""Semi-supervised learning under class distribution mismatch: split, contrastive teacher, weighted loop."""

from kdforge.tasks.ssl.contrastive import (
    ContrastiveEncoder,
    embed,
    nt_xent_loss,
    train_contrastive,
    vector_augment,
)
from kdforge.tasks.ssl.data import SSLData, gaussian_blobs, mismatch_split
from kdforge.tasks.ssl.train import known_accuracy, train_weighted, weighted_pseudo_ce

__all__ = [
    "ContrastiveEncoder",
    "SSLData",
    "embed",
    "gaussian_blobs",
    "known_accuracy",
    "mismatch_split",
    "nt_xent_loss",
    "train_contrastive",
    "train_weighted",
    "vector_augment",
    "weighted_pseudo_ce",
]
