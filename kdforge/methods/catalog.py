"""The catalogue behind `kdforge methods`: the 28 ICCV 2023 seed methods and the baselines.

A method is `implemented` once its module registers it in `kdforge.registry.METHODS` (or, for
baselines, once its loss is in `LOSSES`); everything else is listed as `planned`.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import asdict, dataclass

from kdforge.registry import LOSSES, METHODS

# id -> (family, paper); ids are those of the implementation cards (pNN_<id>.md)
SEED_METHODS: dict[str, tuple[str, str]] = {
    "ssd_det": ("detection", "SSD-Det: Spatial Self-Distillation for Object Detection with Inaccurate Boxes"),
    "iod_wcbc": ("detection", "Within-/Between-Class KD for Incremental Object Detection"),
    "autokd": ("search", "Auto-KD: Automated Knowledge Distillation via Monte Carlo Tree Search"),
    "zeroseg": ("segmentation", "ZeroSeg: Open-Vocabulary Segmentation from CLIP Vision-Encoder Distillation"),
    "otd": ("domain-adaptation", "OTD: Optimization Trajectory Distillation for Taxonomy-Adaptive DA"),
    "tinyclip": ("multimodal", "TinyCLIP: CLIP Distillation via Affinity Mimicking and Weight Inheritance"),
    "rdd": ("3d-detection", "RDD: Representation Disparity-aware Distillation for 3D Object Detection"),
    "sdd": ("generative", "SDD: Selective Diffusion Distillation for Image Manipulation"),
    "sam_audio": ("multimodal", "Spatial Alignment via Matching for Vision-to-Audio Dense Distillation"),
    "crkd": ("novel-class-discovery", "Class-relation Knowledge Distillation for Novel Class Discovery"),
    "upvl": ("3d-detection", "UP-VL: Unsupervised 3D Perception with 2D Vision-Language Distillation"),
    "kd3": ("data-free", "KD3: Knowledge Distillation between Different Distributions"),
    "mtl_cskd": ("dense-prediction", "Multi-Task KD for Dense Prediction with a Cauchy-Schwarz Loss"),
    "adasim": ("self-supervised", "AdaSim: Adaptive Similarity Bootstrapping for Self-Distillation"),
    "ferkd": ("classification", "FerKD: Surgical Label Adaptation for Efficient Distillation"),
    "mdcs": ("long-tail", "MDCS: More Diverse Experts with Consistency Self-distillation"),
    "giftnet": ("image-harmonization", "GiftNet: Globally Guided Feature Transformation and Relation KD"),
    "memkd": ("anomaly-detection", "MemKD: Memory-guided Knowledge Distillation for Anomaly Detection"),
    "bckd": ("detection", "BCKD: Bridging Cross-task Protocol Inconsistency for Dense Detection KD"),
    "mm_ego_kd": ("video", "Multimodal Distillation for Egocentric Action Recognition"),
    "wad": ("semi-supervised", "WAD: Weight-Aware Distillation under Class Distribution Mismatch"),
    "dot": ("optimizer", "DOT: A Distillation-Oriented Trainer"),
    "boss": ("search", "BOSS: Bayesian Optimization Meets Self-Distillation"),
    "unikd": ("detection", "UniKD: Universal KD for Homogeneous or Heterogeneous Object Detectors"),
    "l2d": ("multi-label", "L2D: Multi-Label Knowledge Distillation"),
    "distillbev": ("3d-detection", "DistillBEV: Multi-Camera 3D Detection with Cross-Modal KD"),
    "orc": ("classification", "ORC: Network Group-based KD using Online Role Change"),
    "pointdc": ("point-cloud", "PointDC: Unsupervised 3D Point-Cloud Segmentation via Cross-Modal KD"),
}

BASELINES = ("kd", "dkd", "fitnet", "at", "sp", "rkd", "pkt", "crd")


@dataclass
class MethodInfo:
    id: str
    family: str
    paper: str
    status: str        # "implemented" | "planned"
    kind: str          # "seed" | "baseline"


def import_methods() -> None:
    """Import every module of kdforge.methods so their registrations run."""
    import kdforge.losses  # noqa: F401
    import kdforge.methods as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_") and mod.name != "catalog":
            importlib.import_module(f"kdforge.methods.{mod.name}")


def list_methods() -> list[MethodInfo]:
    """Seed methods in card order, then the baseline losses, then the baseline recipes (e.g. `rd`, `clip`).

    A baseline recipe is any registered method that is not a seed method: the plain training a
    seed method's experiment compares against (reverse distillation, contrastive CLIP, a detector
    without distillation, mutual learning).
    """
    import_methods()
    out = [MethodInfo(mid, fam, paper, "implemented" if mid in METHODS else "planned", "seed")
           for mid, (fam, paper) in SEED_METHODS.items()]
    for name in BASELINES:
        meta = LOSSES.meta(name) if name in LOSSES else {}
        out.append(MethodInfo(name, f"baseline-{meta.get('family', 'kd')}", meta.get("paper", ""),
                              "implemented" if name in LOSSES else "planned", "baseline"))
    for name in sorted(set(METHODS.names()) - set(SEED_METHODS)):
        meta = METHODS.meta(name)
        out.append(MethodInfo(name, f"baseline-{meta.get('family', 'recipe')}", meta.get("paper", ""),
                              "implemented", "baseline"))
    return out


def as_dicts() -> list[dict[str, str]]:
    return [asdict(m) for m in list_methods()]
