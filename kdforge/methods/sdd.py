"""SDD (Wang et al., ICCV 2023): selective diffusion distillation for image manipulation.

A frozen conditional diffusion model teaches a feed-forward manipulator f(x) = x + delta(x)
through score distillation: each edited image y gets the gradient w(t) (eps_hat - eps) toward
the target attribute (classifier-free guidance, no UNet Jacobian; `kdforge.tasks.generative.sds`),
while reg_weight * ||delta||^2 keeps it close to its input. SDD's point is *which* t: the Hybrid
Quality Score (spatial entropy and L1 magnitude of the guidance gradient, min-max normalised over
a t grid, averaged over images) selects the timesteps the manipulator is trained at.

Stages (every one an ordinary, resumable run directory): `classifier` (the attribute classifier
that scores edits), `diffusion` (the class-conditional DDPM; its UNet + scheduler are saved with
`save_pretrained` into `<stage>/unet` and loaded back through `from_pretrained`, the same code as a
user's local pretrained UNet, `diffusion.model.local_dir`), then the manipulator (the run itself).
`only: shared` trains the first two and stops (the diffusion model is then the run itself); another
run reuses them with `shared_run: DIR`. Recipe (`configs/methods/sdd.yaml`)::

    method: sdd
    seed: int                         # the manipulator's init, its batch order, SDS noise and timesteps
    data: {size, num_train, num_test, thickness, length, noise, seed}   # procedural bars
    diffusion: {model: {channels, layers_per_block, attention, norm_groups, timesteps, beta_schedule,
                        local_dir}, loop: LoopConfig, seed, label_dropout, sample_scale, sample_steps}
    classifier: {width, noise, seed, loop: LoopConfig}
    manipulator: {width, bottleneck, num_train, num_val, num_test}
    train: LoopConfig                 # the manipulator's loop (the same for every timestep policy)
    sdd: {timesteps: hqs|hqs_top|all|random, guidance_scale, reg_weight, topk, xi, grid, t_range, hqs_images,
          source, target}
    only: null | shared
    shared_run: null | DIR
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdforge.config import OptimConfig, ScheduleConfig
from kdforge.errors import ConfigError, KdforgeError
from kdforge.registry import METHODS
from kdforge.tasks.common import LoopConfig
from kdforge.tasks.generative.diffusion import DiffusionModelConfig
from kdforge.train.stages import loop_settings, parse_recipe, reuse_stage, run_stage, shared_recipe

__all__ = ["SDD", "SDDArgs", "SDDRecipe", "make_splits", "run_sdd"]

CLASSES = 2


@dataclass
class BarDataConfig:
    size: int = 16
    num_train: int = 2048            # bars of both orientations (diffusion model and classifier)
    num_test: int = 512
    thickness: list[int] = field(default_factory=lambda: [2, 3])
    length: list[int] = field(default_factory=lambda: [8, 14])
    noise: float = 0.0
    seed: int = 0


def _loop(epochs: int, batch: int, lr: float) -> LoopConfig:
    return LoopConfig(epochs=epochs, batch_size=batch, optim=OptimConfig(name="adamw", lr=lr, weight_decay=0.0),
                      schedule=ScheduleConfig(name="cosine"))


@dataclass
class DiffusionStageConfig:
    model: DiffusionModelConfig = field(default_factory=DiffusionModelConfig)
    loop: LoopConfig = field(default_factory=lambda: _loop(40, 64, 2e-3))
    seed: int = 100
    label_dropout: float = 0.2       # share of labels replaced by the null class (classifier-free guidance)
    sample_scale: float = 3.0        # guidance scale of the samples that check the model (premise)
    sample_steps: int = 50
    num_samples: int = 128


@dataclass
class ClassifierConfig:
    width: int = 8
    noise: float = 0.1               # Gaussian pixel noise as augmentation
    seed: int = 200
    loop: LoopConfig = field(default_factory=lambda: _loop(4, 64, 3e-3))


@dataclass
class ManipulatorConfig:
    width: int = 16
    bottleneck: int = 128
    num_train: int = 1024            # source-attribute images the manipulator trains on
    num_val: int = 256               # development split (settings are chosen on it)
    num_test: int = 256


@dataclass
class SDDArgs:
    timesteps: str = "hqs"           # hqs | hqs_top | all | random
    guidance_scale: float = 10.0     # classifier-free guidance of the SDS target (the paper uses 100 with SD)
    reg_weight: float = 1.0          # weight of ||delta||^2 (card's demo: 1)
    topk: int = 0                    # keep the k largest |g| per image (released config: 1024 of 16384); 0 = all
    xi: float = 0.0                  # hqs: train at {t : HQS_t > xi}
    grid: list[int] = field(default_factory=lambda: [20, 180, 10])   # HQS search grid: start, stop, step
    t_range: list[int] | None = None  # random: uniform t in [lo, hi] (default 0.02 T .. 0.98 T, as released)
    hqs_images: int = 64             # images the HQS search averages over
    source: int = 0                  # attribute of the inputs (0 horizontal)
    target: int = 1                  # attribute the edit aims at (1 vertical)


def _manip_loop() -> LoopConfig:
    return LoopConfig(epochs=10, batch_size=32, optim=OptimConfig(name="adamw", lr=1e-3, weight_decay=0.0),
                      schedule=ScheduleConfig(name="constant"))


@dataclass
class SDDRecipe:
    method: str = "sdd"
    seed: int = 0
    data: BarDataConfig = field(default_factory=BarDataConfig)
    diffusion: DiffusionStageConfig = field(default_factory=DiffusionStageConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    manipulator: ManipulatorConfig = field(default_factory=ManipulatorConfig)
    train: LoopConfig = field(default_factory=_manip_loop)
    sdd: SDDArgs = field(default_factory=SDDArgs)
    only: str | None = None          # shared: train the classifier and the diffusion model, then stop
    shared_run: str | None = None    # a finished `only: shared` run whose classifier and diffusion model to reuse

    def check(self, source: str) -> None:
        from kdforge.tasks.generative.sds import POLICIES

        a, T = self.sdd, self.diffusion.model.timesteps
        if a.timesteps not in POLICIES:
            raise ConfigError(f"{source}: sdd.timesteps must be one of {', '.join(POLICIES)}, got {a.timesteps!r}")
        if self.only not in (None, "shared"):
            raise ConfigError(f"{source}: only must be null or 'shared', got {self.only!r}")
        if self.only and (self.shared_run or self.diffusion.model.local_dir):
            raise ConfigError(f"{source}: only: shared trains the shared stages; it cannot take shared_run or "
                              "diffusion.model.local_dir")
        if len(a.grid) != 3 or not 0 <= a.grid[0] <= a.grid[1] < T or a.grid[2] < 1:
            raise ConfigError(f"{source}: sdd.grid must be [start, stop, step] with 0 <= start <= stop < "
                              f"timesteps ({T}) and step >= 1, got {a.grid}")
        if a.t_range is not None and (len(a.t_range) != 2 or not 0 <= a.t_range[0] <= a.t_range[1] < T):
            raise ConfigError(f"{source}: sdd.t_range must be [lo, hi] with 0 <= lo <= hi < {T}, got {a.t_range}")
        if {a.source, a.target} != {0, 1} or a.guidance_scale < 1 or a.reg_weight < 0 or a.hqs_images < 1:
            raise ConfigError(f"{source}: need sdd.source/target = 0/1 or 1/0, guidance_scale >= 1, "
                              "reg_weight >= 0 and hqs_images >= 1")
        if not 0 <= self.diffusion.label_dropout < 1:
            raise ConfigError(f"{source}: diffusion.label_dropout must be in [0, 1), got "
                              f"{self.diffusion.label_dropout}")
        if len(self.data.thickness) != 2 or len(self.data.length) != 2:
            raise ConfigError(f"{source}: data.thickness and data.length must be [min, max]")
        self.diffusion.model.check(f"{source}: diffusion.model")
        if self.diffusion.model.local_dir:
            from kdforge.tasks.generative.diffusion import check_local_dir

            check_local_dir(self.diffusion.model.local_dir)       # before anything trains
        for name in ("diffusion.loop", "classifier.loop", "train"):
            obj = self
            for part in name.split("."):
                obj = getattr(obj, part)
            obj.check(f"{source}: {name}")

    def grid(self) -> list[int]:
        start, stop, step = self.sdd.grid
        return list(range(start, stop + 1, step))

    def t_range(self, steps: int) -> tuple[int, int]:
        """The random policy's range for a model of `steps` timesteps."""
        lo, hi = self.sdd.t_range or [int(0.02 * steps), int(0.98 * steps)]
        return lo, min(hi, steps - 1)


def make_splits(d: BarDataConfig, source: int = 0, m: ManipulatorConfig | None = None) -> dict[str, Any]:
    """Both-orientation train/test bars (diffusion model, classifier) and source-attribute manipulator splits."""
    from kdforge.tasks.generative.data import bar_images

    def bars(labels: torch.Tensor, part: int) -> Any:
        return bar_images(labels, d.size, d.seed * 10 + part, tuple(d.thickness), tuple(d.length), d.noise)

    both = (torch.arange(d.num_train) % CLASSES, torch.arange(d.num_test) % CLASSES)
    m = m or ManipulatorConfig()
    out = {"train": bars(both[0], 0), "test": bars(both[1], 1)}
    for part, (name, n) in enumerate((("edit_train", m.num_train), ("edit_val", m.num_val),
                                      ("edit_test", m.num_test)), start=2):
        out[name] = bars(torch.full((n,), source), part)
    return out


def _identity(r: SDDRecipe) -> dict[str, Any]:
    """The settings that define the shared classifier and diffusion model."""
    diff = dataclasses.asdict(r.diffusion)
    diff["model"].pop("local_dir")
    for k in ("sample_scale", "sample_steps", "num_samples"):
        diff.pop(k)
    return {"data": dataclasses.asdict(r.data), "diffusion": diff, "classifier": dataclasses.asdict(r.classifier)}


def _classifier(cfg: SDDRecipe, run_dir: Path, splits: dict[str, Any], trainer: Any, text: str) -> Any:
    from kdforge.tasks.generative.models import build_classifier
    from kdforge.tasks.generative.task import ClassifierTask

    c = cfg.classifier
    torch.manual_seed(c.seed)
    task = ClassifierTask(build_classifier(c.width, CLASSES), splits["train"], splits["test"], c.loop.batch_size,
                          c.seed, c.noise)
    settings = loop_settings(c.loop, c.seed, trainer)
    if cfg.shared_run:
        return reuse_stage(Path(cfg.shared_run) / "stages" / "classifier", SDDRecipe, cfg, _identity, "sdd",
                           "shared_run classifier", settings, task, "kdforge train with only=shared")
    return run_stage(run_dir, "classifier", settings, task, text)


def _diffusion(cfg: SDDRecipe, run_dir: Path, splits: dict[str, Any], judge: Any, trainer: Any,
               text: str) -> tuple[Path | None, dict[str, Any], Any]:
    """(the saved UNet's directory, the diffusion stage's result, the stage) -- trained, reused or local."""
    from kdforge.tasks.generative.diffusion import build_scheduler, build_unet, save_diffusion
    from kdforge.tasks.generative.task import DDPMModule, DDPMTask

    d = cfg.diffusion
    if d.model.local_dir:
        return Path(d.model.local_dir), {}, None
    if cfg.shared_run:
        shared = Path(cfg.shared_run)
        shared_recipe(shared, SDDRecipe, cfg, _identity, "sdd", "shared_run")
        if not (shared / "result.json").is_file() or not (shared / "unet" / "config.json").is_file():
            raise ConfigError(f"sdd recipe: shared_run {shared} holds no finished diffusion model; train it first "
                              "(kdforge train configs/methods/sdd.yaml only=shared --out DIR)")
        return shared / "unet", json.loads((shared / "result.json").read_text()), None
    torch.manual_seed(d.seed)
    scheduler = build_scheduler(d.model)
    module = DDPMModule(build_unet(d.model, cfg.data.size, CLASSES), scheduler)
    task = DDPMTask(module, splits["train"], splits["test"], d.loop.batch_size, d.seed, CLASSES, d.label_dropout,
                    judge, d.sample_scale, d.sample_steps, d.num_samples)
    stage = run_stage(run_dir, None if cfg.only else "diffusion", loop_settings(d.loop, d.seed, trainer), task, text)
    if stage.stopped:
        return None, stage.result, stage
    unet_dir = stage.run_dir / "unet"
    if not (unet_dir / "config.json").is_file():
        save_diffusion(stage.module.unet, scheduler, unet_dir)
    return unet_dir, stage.result, stage


def run_sdd(cfg: SDDRecipe, run_dir: str | Path, trainer: Any = None, config_text: str = "") -> dict[str, Any]:
    """Classifier and diffusion model (trained, reused or local), the HQS search, then the manipulator."""
    from kdforge.tasks.generative import require_diffusers
    from kdforge.tasks.generative.diffusion import load_diffusion
    from kdforge.tasks.generative.metrics import edit_metrics
    from kdforge.tasks.generative.models import Manipulator
    from kdforge.tasks.generative.sds import hqs_search, select_timesteps
    from kdforge.tasks.generative.task import ManipulatorModule, ManipulatorTask

    require_diffusers()
    run_dir = Path(run_dir)
    a = cfg.sdd
    splits = make_splits(cfg.data, a.source, cfg.manipulator)
    cls_stage = _classifier(cfg, run_dir, splits, trainer, config_text)
    if cls_stage.stopped:
        return cls_stage.result
    classifier = cls_stage.module.eval_model().eval().requires_grad_(False)
    unet_dir, diff_result, stage = _diffusion(cfg, run_dir, splits, classifier, trainer, config_text)
    if unet_dir is None or cfg.only:
        return diff_result if stage is None else stage.result
    unet, scheduler = load_diffusion(unet_dir, cfg.diffusion.model, cfg.data.size, CLASSES)
    unet = unet.eval().requires_grad_(False)
    alphas = scheduler.alphas_cumprod.float()
    null = CLASSES
    steps = int(scheduler.config.num_train_timesteps)
    grid = [t for t in cfg.grid() if t < steps]
    if not grid:
        raise KdforgeError(f"sdd: the HQS grid {cfg.sdd.grid} lies beyond the model's {steps} timesteps")
    search = hqs_search(unet, alphas, splits["edit_train"].images[:a.hqs_images], a.target, null,
                        a.guidance_scale, grid, cfg.seed)
    candidates = select_timesteps(a.timesteps, grid, search.hqs, a.xi, cfg.t_range(steps))
    identity_edit = edit_metrics(classifier, splits["edit_test"].images, splits["edit_test"].images, a.target)
    extra = {"policy": a.timesteps, "timesteps_used": candidates if len(candidates) <= 40 else
             [candidates[0], candidates[-1]], "hqs_grid": grid, "hqs": search.hqs, "hqs_entropy": search.entropy,
             "hqs_magnitude": search.magnitude, "hqs_range": max(search.hqs) - min(search.hqs),
             "hqs_argmax_t": grid[max(range(len(grid)), key=lambda i: search.hqs[i])],
             "input_edit_success": identity_edit["edit_success"], "classifier_test_top1": cls_stage.result.get(
                 "test_top1"), **{k: v for k, v in diff_result.items() if k.startswith(("sample_", "test_ddpm"))}}
    m = cfg.manipulator
    torch.manual_seed(cfg.seed)
    module = ManipulatorModule(Manipulator(cfg.data.size, 1, m.width, m.bottleneck), unet, classifier, alphas,
                               a.target, null, a.guidance_scale, a.reg_weight, a.topk)
    task = ManipulatorTask(module, splits["edit_train"], {"val": splits["edit_val"], "test": splits["edit_test"]},
                           candidates, cfg.train.batch_size, cfg.seed, extra)
    return run_stage(run_dir, None, loop_settings(cfg.train, cfg.seed, trainer), task, config_text).result


class SDD:
    """Registered entry for `method: sdd` recipes."""

    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str, run_dir: Path) -> dict[str, Any]:
        cfg, trainer, text = parse_recipe(tree, source, SDDRecipe, method="sdd")
        cfg.check(source)
        return run_sdd(cfg, run_dir, trainer, text)


METHODS.register(
    "sdd", SDD, family="generative",
    paper="Not All Steps are Created Equal: Selective Diffusion Distillation for Image Manipulation (ICCV 2023)",
    summary="feed-forward manipulator trained by score distillation from a frozen conditional diffusion model at "
            "the timesteps the Hybrid Quality Score selects", task="generative")
