"""ZeroSeg (Chen et al., ICCV 2023): open-vocabulary segmentation from CLIP vision-encoder distillation only.

A frozen CLIP image encoder embeds multi-scale views of each unlabelled training image (the full
image and the cells of 2x2, 3x3, 4x4 grids, each resized to the encoder's input; cached once,
`kdforge.tasks.dense.zeroseg.views`). The student is a GroupViT vision tower (MAE-style encoder
on the visible patches + grouping stages with Gumbel hard assignment -> m segment tokens;
`kdforge.tasks.dense.zeroseg.student`) with two distillation losses (`kdforge.losses.zeroseg`):

    L = rec_weight * L_rec + global_weight * L_ms + match_weight * L_match
    L_ms    = mean_j |z - v_j|_1            over the views of `global_grids` (z: pooled image embedding)
    L_match = sum_i min_j |g_i - v_j|_1     over the cells of `match_grids` (never the full image)

Both sides are L2-normalised. No text is seen in training; at test time segments are labelled by
the CLIP text embeddings of the class prompts, background below a threshold chosen on val.

The teacher is kdforge's own small CLIP (`method: clip`, trained on single shapes with captions)
trained as the stage `teacher`, or any saved CLIP directory (`teacher.model.local_dir`, e.g. a
user's real CLIP or another run's `<run>/model`). The card's ablation arms are overrides:
base = `zeroseg.global_grids=[1] zeroseg.match_weight=0`, +multi-scale = `zeroseg.match_weight=0`,
+matching = `zeroseg.global_grids=[1]`, both = the defaults.

Evidence (configs/experiments/zeroseg.yaml): at the CPU demo's budget the student's grouping
collapses (one or two segments per image) in every arm and variant tried, so both arms sit near
the background-only floor; ZeroSeg's small lead over the base is inconclusive (see its notes).

Recipe (`configs/methods/zeroseg.yaml`)::

    method: zeroseg
    seed: int                       # student initialisation, batch order, masks
    data: {num_train, num_val, num_test, size, min_objects, max_objects, noise, seed}
                                    # canvases; val drawn with data.seed + 1000, test with data.seed + 2000
    teacher: {model: ClipModelConfig (or model.local_dir), data: PairDataConfig, loop: LoopConfig, seed}
    teacher_only: bool              # train (only) the teacher CLIP into the run directory
    model: StudentSpec              # GroupViT sizes (+ grouping: groupvit | pooled), or model.local_dir:
                                    # a saved GroupViTVisionModel
    train: LoopConfig
    zeroseg: {grids, global_weight, global_grids, match_weight, match_grids, rec_weight, mask_ratio}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdforge.config import OptimConfig, ScheduleConfig
from kdforge.errors import ConfigError
from kdforge.methods.clip import ClipRecipe, PairDataConfig, run_clip
from kdforge.registry import METHODS
from kdforge.tasks.common import LoopConfig
from kdforge.tasks.dense.zeroseg.student import StudentSpec, build_student
from kdforge.tasks.dense.zeroseg.task import LossSwitches
from kdforge.tasks.vision_language.models import ClipModelConfig, TowerSpec
from kdforge.train.stages import loop_settings, parse_recipe, run_stage

__all__ = ["CanvasDataConfig", "ZeroSegArgs", "ZeroSegRecipe", "class_embeddings", "load_teacher", "run_zeroseg"]


@dataclass
class CanvasDataConfig:
    num_train: int = 1000
    num_val: int = 100
    num_test: int = 200
    size: int = 64
    min_objects: int = 2
    max_objects: int = 4
    noise: float = 0.1
    seed: int = 0


@dataclass
class ZeroSegArgs(LossSwitches):
    grids: list[int] = field(default_factory=lambda: [1, 2, 3, 4])     # the teacher views cached (30 crops)


def _teacher_model() -> ClipModelConfig:
    return ClipModelConfig(vision=TowerSpec(layers=4, width=128, heads=4, mlp=256),
                           text=TowerSpec(layers=2, width=128, heads=4, mlp=256))


def _loop(epochs: int, lr: float = 1e-3, wd: float = 0.1) -> LoopConfig:
    return LoopConfig(epochs=epochs, batch_size=64,
                      optim=OptimConfig(name="adamw", lr=lr, weight_decay=wd, no_decay_1d=True),
                      schedule=ScheduleConfig(name="cosine", warmup_epochs=0.5), grad_clip=5.0)


@dataclass
class TeacherSpec:
    model: ClipModelConfig = field(default_factory=_teacher_model)     # or model.local_dir: a saved CLIP
    data: PairDataConfig = field(default_factory=PairDataConfig)       # its single-shape captioned pairs
    loop: LoopConfig = field(default_factory=lambda: _loop(15))
    seed: int = 100


@dataclass
class ZeroSegRecipe:
    method: str = "zeroseg"
    seed: int = 0
    data: CanvasDataConfig = field(default_factory=CanvasDataConfig)
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    teacher_only: bool = False
    model: StudentSpec = field(default_factory=StudentSpec)
    train: LoopConfig = field(default_factory=lambda: _loop(15, 1.5e-3, 0.05))
    zeroseg: ZeroSegArgs = field(default_factory=ZeroSegArgs)

    def check(self, source: str) -> None:
        a = self.zeroseg
        if not a.grids or a.grids[0] != 1 or len(set(a.grids)) != len(a.grids) or min(a.grids) < 1:
            raise ConfigError(f"{source}: zeroseg.grids must be distinct grid sizes starting with 1 (the full image), "
                              f"got {a.grids}")
        for name in ("global_grids", "match_grids"):
            extra = set(getattr(a, name)) - set(a.grids)
            if extra:
                raise ConfigError(f"{source}: zeroseg.{name} {sorted(extra)} are not in zeroseg.grids {a.grids}")
        if a.match_weight and 1 in a.match_grids:
            raise ConfigError(f"{source}: zeroseg.match_grids must not hold 1: the full-image view is never a "
                              "matching candidate")
        if min(a.global_weight, a.match_weight, a.rec_weight) < 0 or not (a.global_weight or a.match_weight):
            raise ConfigError(f"{source}: zeroseg weights must be >= 0 and global_weight or match_weight > 0, got "
                              f"{a.global_weight}, {a.match_weight}, {a.rec_weight}")
        if (a.global_weight and not a.global_grids) or (a.match_weight and not a.match_grids):
            raise ConfigError(f"{source}: a zeroseg term with a weight needs its grids (global_grids / match_grids)")
        if not 0 <= a.mask_ratio < 1:
            raise ConfigError(f"{source}: zeroseg.mask_ratio must be in [0, 1), got {a.mask_ratio}")
        if a.rec_weight and not a.mask_ratio:
            raise ConfigError(f"{source}: zeroseg.rec_weight > 0 needs zeroseg.mask_ratio > 0")
        d = self.data
        if min(d.num_train, d.num_val, d.num_test) < 1:
            raise ConfigError(f"{source}: data.num_train, num_val and num_test must be >= 1")
        if self.model.local_dir is None:
            self.model.check(f"{source}: model")
        self.train.check(f"{source}: train")


def load_teacher(local_dir: str | Path, context_length: int = 16) -> tuple[Any, Any, int]:
    """(CLIP, tokenizer, context length) of a saved CLIP directory, frozen (nothing downloads)."""
    from kdforge.tasks.vision_language.models import load_clip
    from kdforge.tasks.vision_language.tokenizer import load_tokenizer

    clip = load_clip(local_dir).eval().requires_grad_(False)
    tokenizer = load_tokenizer(local_dir)
    return clip, tokenizer, min(context_length, clip.config.text_config.max_position_embeddings)


@torch.no_grad()
def class_embeddings(clip: Any, tokenizer: Any, context_length: int) -> torch.Tensor:
    """(25, E) L2-normalised text embeddings of the prompts "a <colour> <shape>" (class order)."""
    import torch.nn.functional as F

    from kdforge.tasks.vision_language.data import class_prompts
    from kdforge.tasks.vision_language.models import encode_texts
    from kdforge.tasks.vision_language.tokenizer import encode

    ids, mask = encode(tokenizer, class_prompts()[1], context_length)
    return F.normalize(encode_texts(clip, ids, mask).float(), dim=-1)


def make_canvas_splits(d: CanvasDataConfig) -> dict[str, Any]:
    from kdforge.tasks.dense.zeroseg.canvases import make_canvases

    common = {"size": d.size, "min_objects": d.min_objects, "max_objects": d.max_objects, "noise": d.noise}
    return {"train": make_canvases(d.num_train, d.seed, **common),
            "val": make_canvases(d.num_val, d.seed + 1000, **common),
            "test": make_canvases(d.num_test, d.seed + 2000, **common)}


def run_zeroseg(cfg: ZeroSegRecipe, run_dir: str | Path, trainer: Any = None, config_text: str = "") -> dict[str, Any]:
    """The teacher CLIP (stage `teacher`, or a local directory), then the ZeroSeg student in `run_dir`."""
    from kdforge.tasks.dense.zeroseg.task import ZeroSegModule, ZeroSegTask
    from kdforge.tasks.vision_language import require_transformers

    require_transformers()
    run_dir = Path(run_dir)
    t = cfg.teacher
    if t.model.local_dir:
        teacher_dir = Path(t.model.local_dir)
    else:
        recipe = ClipRecipe(seed=t.seed, data=t.data, model=t.model, train=t.loop)
        stage = run_clip(recipe, run_dir, trainer, config_text, stage=None if cfg.teacher_only else "teacher")
        if cfg.teacher_only or stage.stopped:
            return stage.result
        teacher_dir = stage.run_dir / "model"
    if cfg.teacher_only:
        raise ConfigError("teacher_only=true with teacher.model.local_dir: there is no teacher to train")
    clip, tokenizer, context = load_teacher(teacher_dir, t.model.context_length)
    text = class_embeddings(clip, tokenizer, context)
    splits = make_canvas_splits(cfg.data)
    torch.manual_seed(cfg.seed)
    student = build_student(cfg.model, cfg.data.size, int(clip.config.projection_dim), cfg.zeroseg.rec_weight > 0)
    module = ZeroSegModule(student, cfg.zeroseg, cfg.zeroseg.grids)
    task = ZeroSegTask(module, splits, clip, text, cfg.zeroseg.grids, cfg.train.batch_size, cfg.seed,
                       extra_result={"teacher_dir": str(t.model.local_dir or "stages/teacher/model")})
    return run_stage(run_dir, None, loop_settings(cfg.train, cfg.seed, trainer), task, config_text).result


class ZeroSeg:
    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str, run_dir: Path) -> dict[str, Any]:
        cfg, trainer, text = parse_recipe(tree, source, ZeroSegRecipe, method="zeroseg")
        cfg.check(source)
        return run_zeroseg(cfg, run_dir, trainer, text)


METHODS.register(
    "zeroseg", ZeroSeg, family="segmentation",
    paper="Exploring Open-Vocabulary Semantic Segmentation from CLIP Vision Encoder Distillation Only (ICCV 2023)",
    summary="GroupViT-style student (MAE encoder + grouping into segment tokens) distils a frozen CLIP image "
            "encoder: multi-scale global L1 over full-image + grid-cell views and segment-to-nearest-cell "
            "matching L1; segments labelled zero-shot by CLIP text embeddings", task="segmentation")
