"""Novel class discovery setting: known/novel split, Hungarian clustering accuracy, UNO baseline."""

from kdforge.tasks.ncd.data import NCDData, ncd_split, procedural_ncd
from kdforge.tasks.ncd.losses import discovery_targets, sinkhorn_knopp, swapped_prediction_loss
from kdforge.tasks.ncd.metrics import cluster_accuracy, hungarian_match, split_cluster_accuracy
from kdforge.tasks.ncd.model import DiscoveryNet, MultiHead, Prototypes, discovery_net
from kdforge.tasks.ncd.train import (
    ExtraLoss,
    NCDSpec,
    evaluate_ncd,
    make_views,
    pretrain_known,
    train_discovery,
)

__all__ = [
    "DiscoveryNet",
    "ExtraLoss",
    "MultiHead",
    "NCDData",
    "NCDSpec",
    "Prototypes",
    "cluster_accuracy",
    "discovery_net",
    "discovery_targets",
    "evaluate_ncd",
    "hungarian_match",
    "make_views",
    "ncd_split",
    "pretrain_known",
    "procedural_ncd",
    "sinkhorn_knopp",
    "split_cluster_accuracy",
    "swapped_prediction_loss",
    "train_discovery",
]
