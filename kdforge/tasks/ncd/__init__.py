"""Novel class discovery setting: known/novel split, Hungarian clustering accuracy, UNO as Trainer tasks."""

from kdforge.tasks.ncd.data import NCDData, ncd_split, procedural_ncd
from kdforge.tasks.ncd.evaluate import evaluate_ncd, known_accuracy
from kdforge.tasks.ncd.losses import discovery_targets, sinkhorn_knopp, swapped_prediction_loss
from kdforge.tasks.ncd.metrics import cluster_accuracy, hungarian_match, split_cluster_accuracy
from kdforge.tasks.ncd.model import DiscoveryNet, MultiHead, Prototypes, discovery_net
from kdforge.tasks.ncd.train import (
    DiscoveryModule,
    DiscoveryTask,
    ExtraLoss,
    PretrainModule,
    PretrainTask,
    reset_novel_heads,
)
from kdforge.tasks.ncd.views import NCDBatch, NCDSpec, make_views, ncd_batch

__all__ = [
    "DiscoveryModule",
    "DiscoveryNet",
    "DiscoveryTask",
    "ExtraLoss",
    "MultiHead",
    "NCDBatch",
    "NCDData",
    "NCDSpec",
    "PretrainModule",
    "PretrainTask",
    "Prototypes",
    "cluster_accuracy",
    "discovery_net",
    "discovery_targets",
    "evaluate_ncd",
    "hungarian_match",
    "known_accuracy",
    "make_views",
    "ncd_batch",
    "ncd_split",
    "procedural_ncd",
    "reset_novel_heads",
    "sinkhorn_knopp",
    "split_cluster_accuracy",
    "swapped_prediction_loss",
]
