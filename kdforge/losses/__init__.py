"""Baseline distillation losses: pure functions plus thin registered `DistillLoss` modules.

Importing this package registers every loss in `kdforge.registry.LOSSES`. Teacher inputs
are always detached inside the losses, so no gradient reaches the teacher through them.
"""

from kdforge.losses import autokd  # noqa: F401  (registers the searched Auto-KD distiller loss)
from kdforge.losses.at import ATLoss, at_loss, attention_map
from kdforge.losses.base import DistillLoss, Features, LossContext, Shape
from kdforge.losses.bckd import bckd_cls_loss, bckd_loc_loss, bckd_location_weights
from kdforge.losses.ce import CELoss, ce_loss, soft_ce_loss
from kdforge.losses.crd import CRDLoss, crd_nce_loss, sample_negatives
from kdforge.losses.cs import CSLoss, cs_divergence, cs_inter, cs_intra
from kdforge.losses.distillbev import distillbev_terms
from kdforge.losses.dkd import DKDLoss, dkd_loss, dkd_parts
from kdforge.losses.fitnet import FitNetLoss, fitnet_loss
from kdforge.losses.giftnet import relation_distill_loss
from kdforge.losses.iod_wcbc import distance_matrix_kd, semantic_guided_feature_kd
from kdforge.losses.kd import KDLoss, kd_loss
from kdforge.losses.l2d import L2DLEDLoss, L2DMLDLoss, l2d_led_loss, l2d_mld_loss
from kdforge.losses.memkd import memorisation_loss, orthogonality_loss
from kdforge.losses.pkt import PKTLoss, pkt_loss
from kdforge.losses.rdd import rdd_losses
from kdforge.losses.rkd import RKDLoss, rkd_loss
from kdforge.losses.sam_audio import loose_triplet_feature_kd
from kdforge.losses.sp import SPLoss, similarity_matrix, sp_loss
from kdforge.losses.tinyclip import affinity_mimicking_loss, clip_contrastive_loss
from kdforge.losses.zeroseg import multiscale_global_l1, segment_matching_l1

__all__ = [
    "bckd_cls_loss",
    "bckd_loc_loss",
    "bckd_location_weights",
    "affinity_mimicking_loss", "clip_contrastive_loss", "distance_matrix_kd", "memorisation_loss",
    "orthogonality_loss", "semantic_guided_feature_kd",
    "ATLoss", "CELoss", "CRDLoss", "DKDLoss", "DistillLoss", "Features", "FitNetLoss", "KDLoss",
    "L2DLEDLoss", "L2DMLDLoss", "l2d_led_loss", "l2d_mld_loss",
    "LossContext", "PKTLoss", "RKDLoss", "SPLoss", "Shape", "at_loss", "attention_map", "ce_loss",
    "crd_nce_loss", "dkd_loss", "dkd_parts", "fitnet_loss", "kd_loss", "pkt_loss", "rkd_loss",
    "sample_negatives", "similarity_matrix", "soft_ce_loss", "sp_loss",
    "relation_distill_loss",
    "CSLoss", "cs_divergence", "cs_inter", "cs_intra", "rdd_losses", "multiscale_global_l1", "segment_matching_l1",
    "loose_triplet_feature_kd", "distillbev_terms",
]
