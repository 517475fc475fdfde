"""`method: clip` recipes: plain CLIP training (InfoNCE, no distillation) on the one Trainer.

The vision-language package's baseline, and how TinyCLIP's teachers are trained. Recipe schema
(`configs/vision_language/clip.yaml`)::

    method: clip
    seed: int                        # initialisation and batch order
    data: {num_train, num_val, num_test, size, noise, distractors, seed}
                                     # procedural pairs; val drawn with data.seed + 1000, test + 2000
    model: {vision: {layers, width, heads, mlp}, text: {...}, patch_size, projection_dim,
            context_length, local_dir}
                                     # local_dir: a saved CLIP (+ tokenizer) to start from instead
    train: LoopConfig                # {epochs, batch_size, optim, schedule, grad_clip, progress}
    trainer: {...}                   # optional TrainerConfig options

Result: test zero-shot accuracy (25 prompts), image<->text recall@1/@5, parameters, encoding
speed, and predictions.png; the trained model and its tokenizer are saved to `<run>/model`
(`save_pretrained`), loadable with `from_pretrained` or as another recipe's `model.local_dir`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdforge.config import OptimConfig, ScheduleConfig
from kdforge.errors import ConfigError, KdforgeError
from kdforge.registry import METHODS
from kdforge.tasks.common import LoopConfig
from kdforge.tasks.vision_language.models import ClipModelConfig
from kdforge.train.stages import StageRun, loop_settings, parse_recipe, run_stage

__all__ = ["ClipRecipe", "PairDataConfig", "VLModel", "load_or_build", "make_splits", "run_clip", "save_model"]


@dataclass
class PairDataConfig:
    num_train: int = 4000
    num_val: int = 250
    num_test: int = 250
    size: int = 32
    noise: float = 0.1
    distractors: int = 2
    seed: int = 0


def clip_loop(epochs: int = 10) -> LoopConfig:
    """CLIP's training loop (every CLIP recipe's default): AdamW 1e-3, weight decay 0.1 off 1-d
    parameters, cosine with half an epoch of warm-up, gradients clipped at 5."""
    return LoopConfig(epochs=epochs, batch_size=64,
                      optim=OptimConfig(name="adamw", lr=1e-3, weight_decay=0.1, no_decay_1d=True),
                      schedule=ScheduleConfig(name="cosine", warmup_epochs=0.5), grad_clip=5.0)


@dataclass
class ClipRecipe:
    method: str = "clip"
    seed: int = 0
    data: PairDataConfig = field(default_factory=PairDataConfig)
    model: ClipModelConfig = field(default_factory=ClipModelConfig)
    train: LoopConfig = field(default_factory=clip_loop)


def make_splits(d: PairDataConfig) -> dict[str, Any]:
    """Train / val / test pairs (val seeded data.seed + 1000, test data.seed + 2000)."""
    from kdforge.tasks.vision_language.data import make_pairs

    if min(d.num_train, d.num_val, d.num_test) < 2:
        raise ConfigError("data: num_train, num_val and num_test must be >= 2")
    common = {"size": d.size, "noise": d.noise, "distractors": d.distractors}
    return {"train": make_pairs(d.num_train, d.seed, **common), "val": make_pairs(d.num_val, d.seed + 1000, **common),
            "test": make_pairs(d.num_test, d.seed + 2000, **common)}


@dataclass
class VLModel:
    """A CLIP with the tokenizer its text tower reads and the context length to pad to."""

    clip: Any
    tokenizer: Any
    context_length: int


def load_or_build(m: ClipModelConfig, image_size: int, where: str = "model", vocab: list[str] | None = None) -> VLModel:
    """The recipe's CLIP: loaded (with its tokenizer) from `local_dir`, else random init of its sizes (over
    `vocab`, default the procedural pairs' vocabulary)."""
    from kdforge.tasks.vision_language.data import vocabulary
    from kdforge.tasks.vision_language.models import build_clip, load_clip
    from kdforge.tasks.vision_language.tokenizer import build_tokenizer, load_tokenizer

    if m.local_dir:
        clip = load_clip(m.local_dir)
        tokenizer = load_tokenizer(m.local_dir)
        if clip.config.vision_config.image_size != image_size:
            raise KdforgeError(f"{where}.local_dir {m.local_dir}: its vision tower takes "
                               f"{clip.config.vision_config.image_size} px images, the data are {image_size} px")
        return VLModel(clip, tokenizer, min(m.context_length, clip.config.text_config.max_position_embeddings))
    m.check(where)
    vocab = vocabulary() if vocab is None else list(vocab)
    return VLModel(build_clip(m, len(vocab), image_size), build_tokenizer(vocab, m.context_length), m.context_length)


def save_model(clip: Any, tokenizer: Any, path: Path) -> None:
    """`save_pretrained` of the CLIP and its tokenizer into `path` (rank 0; reloadable as a local_dir)."""
    from kdforge.train.distributed import dist_env_from_environment

    if dist_env_from_environment().is_main:
        clip.save_pretrained(str(path))
        tokenizer.save_pretrained(str(path))


def run_clip(cfg: ClipRecipe, run_dir: str | Path, trainer: Any = None, config_text: str = "",
             stage: str | None = None, splits: dict[str, Any] | None = None, vocab: list[str] | None = None,
             prompts: tuple[list[str], list[str]] | None = None) -> StageRun:
    """Train a CLIP with InfoNCE into `run_dir` (or its stage `stage`), then save it to `<dir>/model`.

    Another method's own image-caption data: `splits` (train / val / test `PairData`, replacing
    `cfg.data`'s procedural pairs; images of `cfg.data.size` px), the `vocab` its captions use and the
    zero-shot `prompts` (class names, prompts) its labels index."""
    from kdforge.tasks.vision_language import require_transformers
    from kdforge.tasks.vision_language.task import ClipModule, VisionLanguageTask

    require_transformers()
    cfg.train.check("train")
    splits = make_splits(cfg.data) if splits is None else splits
    torch.manual_seed(cfg.seed)
    vl = load_or_build(cfg.model, cfg.data.size, vocab=vocab)
    task = VisionLanguageTask(ClipModule(vl.clip), splits, vl.tokenizer, vl.context_length, cfg.train.batch_size,
                              cfg.seed)
    if prompts is not None:
        from kdforge.tasks.vision_language.tokenizer import encode

        task.class_names, task.prompts = list(prompts[0]), encode(vl.tokenizer, prompts[1], vl.context_length)
    out = run_stage(run_dir, stage, loop_settings(cfg.train, cfg.seed, trainer), task, config_text)
    if not out.stopped and not (out.run_dir / "model" / "config.json").is_file():
        save_model(out.module.eval_model(), vl.tokenizer, out.run_dir / "model")
    return out


class Clip:
    """Registered entry for `method: clip` recipes."""

    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str, run_dir: Path) -> dict[str, Any]:
        cfg, trainer, text = parse_recipe(tree, source, ClipRecipe, method="clip")
        return run_clip(cfg, run_dir, trainer, text).result


METHODS.register("clip", Clip, family="vision-language", paper="CLIP: Learning Transferable Visual Models From "
                 "Natural Language Supervision (ICML 2021), plain contrastive training (no distillation)",
                 summary="train a transformers CLIPModel with InfoNCE on procedural image-caption pairs; zero-shot "
                         "accuracy and retrieval recall", task="vision-language")
