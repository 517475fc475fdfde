"""GiftNet (Niu et al., ICCV 2023): deep image harmonization with globally guided feature transformation
and foreground-background relation distillation from the real image (card p17).

Harmonization restores the real image I_r from a composite I_c whose foreground (mask M) is lit
inconsistently with its background. GiftNet adds two things to an encoder-decoder:

1. globally guided feature transformation: inside the encoder, foreground features are transformed
   with parameters predicted from global context, F' = M ((1 + gamma) F + beta) + (1 - M) F,
   (gamma, beta) = MLP(GAP_bg(F)) (`kdforge.tasks.dense.harmonize.GlobalGuidedTransform`);
2. relation distillation (privileged-information self-distillation): the real image goes through
   the same encoder without gradient; the cosine relation between every foreground and every
   background position of the composite's transformed features is matched to the real image's,

       R(F)[i, j] = <f_i, f_j>, i in fg(avgpool(M) > 0.5), j in bg;   L_RD = sum_l mean |R(F_c^l) - R(F_r^l)|

   (`kdforge.losses.giftnet`), giving the encoder intermediate supervision. Inference uses only
   the composite.

    L = L_rec + lambda_RD * L_RD,   L_rec = iSSAM's foreground-normalised MSE
        sum_{c,p} (I_hat - I_r)^2 / (C max(|M|, min_area H W))

Deviations / reconstructions (the official code is not released; everything beyond the abstract
is the card's reconstruction): the network is the dense package's small UNet with a masked
residual output (I_hat = I_c + M * head(.), head zero-initialised) instead of GiftNet's backbone;
the transform is a per-channel affine from an MLP (no dynamic kernels), on the stages named in
`giftnet.transform_layers`, guided by the background average (`guidance: background`) or by the
background and foreground averages (`both`); the relation is pixel-to-pixel cosine, L1 by
default (`distance: kl`: row softmax with temperature tau and KL), on `giftnet.layers`, feature
maps pooled to at most `pool` x `pool`, optionally `sample` random fg / bg positions per image;
the real-image branch shares the weights, runs under no_grad with batch-norm batch statistics and
frozen running statistics. min_area is a fraction of the image (iSSAM's 100 px at 256 px).

Recipe schema (`configs/methods/giftnet.yaml`; `kdforge train configs/methods/giftnet.yaml --out runs/x`)::

    method: giftnet
    seed: int                         # initialisation, batch order and flips
    data: {format: procedural | iharmony4, root, size, num_train, num_val, num_test, seed,
           max_objects, strength, min_area, noise, illuminant, bias}
                                      # procedural: kdforge.tasks.dense.composites.procedural_composites;
                                      #   illuminant > 0: real = scene under one global illuminant, the
                                      #   composite's foreground under another (+ bias, + the shift at
                                      #   strength, 0: none)
                                      # iharmony4: one sub-dataset folder (root), its _train / _test lists;
                                      #   num_train / num_test: the first n (0: all); num_val: the last
                                      #   num_val of the training list held out
    model: {width, depth}
    train: LoopConfig
    flip: bool
    giftnet: {transform, transform_layers, guidance, lambda_rd, layers, distance, tau, pool, sample,
              min_area}

The baseline (the same UNet with L_rec only) is `giftnet.transform=false giftnet.lambda_rd=0`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdforge.config import OptimConfig, ScheduleConfig
from kdforge.errors import ConfigError
from kdforge.registry import METHODS
from kdforge.tasks.common import LoopConfig
from kdforge.train.stages import loop_settings, parse_recipe, run_stage

__all__ = ["GiftNetArgs", "GiftNetRecipe", "HarmonyDataConfig", "run_giftnet"]


@dataclass
class HarmonyDataConfig:
    format: str = "procedural"       # procedural | iharmony4
    root: str = ""                   # iharmony4: one sub-dataset folder (composite_images, masks, real_images)
    size: int = 32
    num_train: int = 400
    num_val: int = 0
    num_test: int = 200
    seed: int = 0
    max_objects: int = 4
    strength: float = 1.0            # procedural: scale of the re-lighting (0: none; needs illuminant > 0)
    illuminant: float = 0.0          # procedural: scale of the global scene illuminant (0: none, the first setting)
    bias: float = 0.0                # procedural, illuminant > 0: max per-channel offset of the composite's fg
    min_area: float = 0.01           # procedural: smallest foreground (fraction of the image)
    noise: float = 0.02


@dataclass
class HarmonyModelConfig:
    width: int = 8
    depth: int = 4


@dataclass
class GiftNetArgs:
    transform: bool = True                                                   # globally guided transformation
    transform_layers: list[str] = field(default_factory=lambda: ["enc3", "enc4"])
    guidance: str = "background"                                             # background | both
    lambda_rd: float = 1.0                                                   # relation distillation weight
    layers: list[str] = field(default_factory=lambda: ["enc3", "enc4"])      # relation levels (also the gap's)
    distance: str = "l1"                                                     # l1 | kl
    tau: float = 0.1                                                         # kl: row-softmax temperature
    pool: int = 16                                                           # features pooled to <= pool^2
    sample: int = 0                                                          # random fg / bg positions (0: all)
    min_area: float = 100 / 65536                                            # L_rec's smallest area (fraction)


def _loop() -> LoopConfig:
    return LoopConfig(epochs=10, batch_size=16, optim=OptimConfig(name="adamw", lr=3e-3, weight_decay=1e-4),
                      schedule=ScheduleConfig(name="cosine"))


@dataclass
class GiftNetRecipe:
    method: str = "giftnet"
    seed: int = 0
    data: HarmonyDataConfig = field(default_factory=HarmonyDataConfig)
    model: HarmonyModelConfig = field(default_factory=HarmonyModelConfig)
    train: LoopConfig = field(default_factory=_loop)
    flip: bool = True
    giftnet: GiftNetArgs = field(default_factory=GiftNetArgs)

    def check(self, source: str) -> None:
        from kdforge.losses.giftnet import DISTANCES
        from kdforge.tasks.dense.harmonize import GUIDANCE

        d, m, a = self.data, self.model, self.giftnet
        if d.format not in ("procedural", "iharmony4"):
            raise ConfigError(f"{source}: data.format must be procedural or iharmony4, got {d.format!r}")
        if d.format == "iharmony4" and not d.root:
            raise ConfigError(f"{source}: data.format iharmony4 needs data.root: DIR (composite_images, masks, "
                              "real_images, <name>_train.txt, <name>_test.txt)")
        if m.width < 1 or not 2 <= m.depth <= 5:
            raise ConfigError(f"{source}: model.width must be >= 1 and model.depth in 2..5, got {m.width}, {m.depth}")
        if d.size < 8 or d.size % 2 ** (m.depth - 1):
            raise ConfigError(f"{source}: data.size {d.size} must be >= 8 and divisible by {2 ** (m.depth - 1)}")
        if d.num_val < 0 or d.num_train < 0 or d.num_test < 0 or (d.format == "procedural"
                                                                  and min(d.num_train, d.num_test) < 1):
            raise ConfigError(f"{source}: data.num_train / num_test must be >= 1 (iharmony4: 0 = all) and "
                              f"num_val >= 0, got {d.num_train}, {d.num_test}, {d.num_val}")
        if d.strength < 0 or d.illuminant < 0 or d.bias < 0 or not 0 < d.min_area < 1:
            raise ConfigError(f"{source}: data.strength, data.illuminant and data.bias must be >= 0 and "
                              "data.min_area in (0, 1)")
        if d.illuminant == 0 and (d.strength == 0 or d.bias > 0):
            raise ConfigError(f"{source}: data.strength 0 or data.bias > 0 needs data.illuminant > 0 (a global "
                              "scene illuminant; otherwise the composites are not re-lit)")
        levels = [f"enc{i + 1}" for i in range(m.depth)]
        bad = [x for x in [*a.layers, *(a.transform_layers if a.transform else [])] if x not in levels]
        if bad:
            raise ConfigError(f"{source}: giftnet level {bad[0]!r} is not an encoder stage of a depth-{m.depth} "
                              f"model ({', '.join(levels)})")
        if a.transform and not a.transform_layers:
            raise ConfigError(f"{source}: giftnet.transform needs giftnet.transform_layers (e.g. [enc3, enc4])")
        if a.guidance not in GUIDANCE:
            raise ConfigError(f"{source}: giftnet.guidance must be one of {', '.join(GUIDANCE)}, got {a.guidance!r}")
        if a.distance not in DISTANCES:
            raise ConfigError(f"{source}: giftnet.distance must be one of {', '.join(DISTANCES)}, got {a.distance!r}")
        if a.lambda_rd < 0 or a.tau <= 0 or a.pool < 1 or a.sample < 0 or not 0 <= a.min_area < 1:
            raise ConfigError(f"{source}: need giftnet.lambda_rd >= 0, tau > 0, pool >= 1, sample >= 0 and "
                              f"min_area in [0, 1), got {a.lambda_rd}, {a.tau}, {a.pool}, {a.sample}, {a.min_area}")
        if a.lambda_rd > 0 and not a.layers:
            raise ConfigError(f"{source}: giftnet.lambda_rd > 0 needs giftnet.layers (e.g. [enc3, enc4])")
        self.train.check(f"{source}: train")


def _data(cfg: GiftNetRecipe) -> tuple[Any, Any, Any]:
    """(train, test, val or None)."""
    from kdforge.tasks.dense.composites import HarmonizationData, load_iharmony4, procedural_composites

    d = cfg.data
    if d.format == "iharmony4":
        train = load_iharmony4(d.root, "train", d.size, d.num_train + d.num_val if d.num_train else None)
        test = load_iharmony4(d.root, "test", d.size, d.num_test or None)
        val = None
        if d.num_val:
            if len(train) <= d.num_val:
                raise ConfigError(f"giftnet recipe: data.num_val {d.num_val} leaves no training composite of "
                                  f"{len(train)}")
            cut = len(train) - d.num_val
            part = [(x[:cut], x[cut:]) for x in (train.real, train.composite, train.mask)]
            names = train.names or []
            val = HarmonizationData(*(p[1] for p in part), names=names[cut:])
            train = HarmonizationData(*(p[0] for p in part), names=names[:cut])
        return train, test, val
    # disjoint streams of one data seed: train, test and validation never share a scene
    make = [procedural_composites(n, d.seed * 3 + k, d.size, 1, d.max_objects, d.strength, d.min_area,
                                  noise=d.noise, illuminant=d.illuminant, bias=d.bias) if n > 0 else None
            for k, n in enumerate((d.num_train, d.num_test, d.num_val))]
    return make[0], make[1], make[2]


def build_module(cfg: GiftNetRecipe) -> Any:
    from kdforge.tasks.dense.harmonize import HarmonizationModule, HarmonizationNet

    a, m = cfg.giftnet, cfg.model
    torch.manual_seed(cfg.seed)
    net = HarmonizationNet(m.width, m.depth, a.transform_layers if a.transform else (), a.guidance)
    return HarmonizationModule(net, a.lambda_rd, a.layers, a.distance, a.tau, a.pool, a.sample, a.min_area,
                               cfg.seed)


def run_giftnet(cfg: GiftNetRecipe, run_dir: str | Path, trainer: Any = None, config_text: str = "") -> dict[str, Any]:
    from kdforge.tasks.dense.harmonize import HarmonizationTask
    from kdforge.tasks.dense.metrics import require_torchmetrics

    require_torchmetrics()
    train, test, val = _data(cfg)
    task = HarmonizationTask(build_module(cfg), train, test, cfg.train.batch_size, cfg.seed, cfg.flip, val)
    return run_stage(run_dir, None, loop_settings(cfg.train, cfg.seed, trainer), task, config_text).result


class GiftNet:
    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str, run_dir: Path) -> dict[str, Any]:
        cfg, trainer, text = parse_recipe(tree, source, GiftNetRecipe, method="giftnet")
        cfg.check(source)
        return run_giftnet(cfg, run_dir, trainer, text)


METHODS.register(
    "giftnet", GiftNet, family="image-harmonization",
    paper="Deep Image Harmonization with Globally Guided Feature Transformation and Relation Distillation "
          "(ICCV 2023)",
    summary="UNet harmonizer; foreground features affinely transformed with parameters from global (background) "
            "context; the composite's foreground-background feature relations matched to the real image's "
            "(same network, no gradient) as intermediate supervision", task="dense")
