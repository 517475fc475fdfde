"""TinyCLIP (Wu et al., ICCV 2023): affinity mimicking + weight inheritance, progressive compression.

A frozen teacher CLIP and a smaller student CLIP see the same batch. Affinity mimicking
(`kdforge.losses.tinyclip.affinity_mimicking_loss`) matches the student's in-batch image->text
and text->image softmax distributions to the teacher's, the teacher's scale fixed (card: 50)
and the student's own logit scale learnable; the paper's default (alpha = 1) switches CLIP's
InfoNCE off (`tinyclip.clip` > 0 adds it back, the ablation). Manual weight inheritance
(`kdforge.tasks.vision_language.inherit`) initialises the student from the teacher: uniformly
spaced layers, leading widths and the first heads of both towers, embeddings and projections.
Progressive compression trains `tinyclip.progressive` intermediate sizes first, each stage
inheriting from the previous stage's trained model and distilled from the same teacher.

Recipe (`configs/methods/tinyclip.yaml`): the `clip` schema (data, model = the student, train,
seed) plus `teacher` (its model and loop, or `teacher.model.local_dir`: a saved CLIP + tokenizer,
e.g. a user's real weights or another run's `<run>/model`), `teacher_only` and `tinyclip`
{inherit: manual | auto | none, distill, clip, teacher_scale, progressive, progressive_epochs, auto}. Stages:
`<run>/stages/teacher` (unless local), `<run>/stages/progressive<i>`, then the student in `<run>`.
Each trained model is saved to `<its dir>/model`.

Automatic inheritance (`tinyclip.inherit: auto`, `kdforge.tasks.vision_language.l0`): a full copy of
the teacher trains under hard-concrete gates on heads, MLP neurons and whole attention / MLP
blocks of both towers with a Lagrangian sparsity term (target ramped linearly) in stage `prune`;
the gates are then fused once into a smaller CLIP that keeps training in `<run>` (a new stage:
the optimizer and schedule are rebuilt). Its layers may differ in size, which a CLIPConfig cannot
describe, so it is kept in the run's checkpoint, not saved as a `<run>/model` directory. Not
built: hidden-dimension gates. The student's logit scale is not excluded from weight decay (the
Trainer builds one parameter group).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdforge.errors import ConfigError, KdforgeError
from kdforge.methods.clip import (
    ClipRecipe,
    PairDataConfig,
    clip_loop,
    load_or_build,
    make_splits,
    run_clip,
    save_model,
)
from kdforge.registry import METHODS
from kdforge.tasks.common import LoopConfig
from kdforge.tasks.vision_language.models import ClipModelConfig, TowerSpec
from kdforge.train.stages import loop_settings, parse_recipe, run_stage

__all__ = ["TinyClipArgs", "TinyClipRecipe", "run_tinyclip"]


@dataclass
class AutoInheritArgs:
    """Automatic inheritance: gates on a full copy of the teacher, trained `prune_epochs`, fused once."""

    target_sparsity: float = 0.5     # share of the encoders' attention + MLP parameters (both towers) removed
    prune_epochs: int = 3            # masked training before the fusion (then train.epochs on the fused model)
    ramp: float = 0.5                # share of the prune steps over which the target rises linearly from 0
    mask_init: float = 3.0           # initial log-alpha (high: keep everything)
    mask_gain: float = 100.0         # log-alpha = init + gain * raw: its speed under the run's learning rate
    lambda_init: float = 10.0
    lambda_lr: float = 0.02          # gradient ascent on the Lagrange multipliers


@dataclass
class TinyClipArgs:
    inherit: str = "manual"          # manual | auto (learned masks, fused) | none (random init)
    distill: float = 1.0             # alpha * w: affinity mimicking
    clip: float = 0.0                # (1 - alpha) * w: CLIP's InfoNCE on the student
    teacher_scale: float = 50.0      # the teacher's fixed logit scale in the affinities
    progressive: list[ClipModelConfig] = field(default_factory=list)   # intermediate students, largest first
    progressive_epochs: int | None = None                               # per intermediate stage (default train)
    auto: AutoInheritArgs = field(default_factory=AutoInheritArgs)


def _teacher_model() -> ClipModelConfig:
    return ClipModelConfig(vision=TowerSpec(layers=4, width=128, heads=4, mlp=256),
                           text=TowerSpec(layers=2, width=128, heads=4, mlp=256))


@dataclass
class TeacherSpec:
    model: ClipModelConfig = field(default_factory=_teacher_model)     # or model.local_dir: a saved CLIP
    loop: LoopConfig = field(default_factory=lambda: clip_loop(15))
    seed: int = 100


@dataclass
class TinyClipRecipe:
    method: str = "tinyclip"
    seed: int = 0
    data: PairDataConfig = field(default_factory=PairDataConfig)
    model: ClipModelConfig = field(default_factory=ClipModelConfig)    # the student
    train: LoopConfig = field(default_factory=lambda: clip_loop(10))
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    teacher_only: bool = False
    tinyclip: TinyClipArgs = field(default_factory=TinyClipArgs)

    def check(self, source: str) -> None:
        a = self.tinyclip
        if a.inherit not in ("manual", "auto", "none"):
            raise ConfigError(f"{source}: tinyclip.inherit must be manual, auto or none, got {a.inherit!r}")
        if a.inherit == "auto":
            au = a.auto
            if a.progressive:
                raise ConfigError(f"{source}: tinyclip.inherit auto prunes to tinyclip.auto.target_sparsity in one "
                                  "stage; leave tinyclip.progressive empty")
            if not 0 < au.target_sparsity < 1 or au.prune_epochs < 1 or not 0 < au.ramp <= 1:
                raise ConfigError(f"{source}: tinyclip.auto needs 0 < target_sparsity < 1, prune_epochs >= 1 and "
                                  f"0 < ramp <= 1, got {au.target_sparsity}, {au.prune_epochs}, {au.ramp}")
            if au.mask_gain <= 0 or au.lambda_lr < 0:
                raise ConfigError(f"{source}: tinyclip.auto.mask_gain must be > 0 and lambda_lr >= 0")
        if a.distill < 0 or a.clip < 0 or a.distill + a.clip <= 0:
            raise ConfigError(f"{source}: tinyclip.distill and tinyclip.clip must be >= 0 and not both 0, "
                              f"got {a.distill}, {a.clip}")
        if a.teacher_scale <= 0:
            raise ConfigError(f"{source}: tinyclip.teacher_scale must be > 0, got {a.teacher_scale}")
        if a.progressive_epochs is not None and a.progressive_epochs < 1:
            raise ConfigError(f"{source}: tinyclip.progressive_epochs must be >= 1")
        if self.model.local_dir or any(m.local_dir for m in a.progressive):
            raise ConfigError(f"{source}: the student is built from its sizes (model.local_dir is for the teacher: "
                              "teacher.model.local_dir)")
        self.train.check(f"{source}: train")


def _check_inheritable(cfg: TinyClipRecipe) -> None:
    """Before anything trains: each inheriting model no larger than the one it inherits from."""
    if cfg.tinyclip.inherit != "manual" or cfg.teacher.model.local_dir:
        return                       # a local teacher's sizes are checked when it is loaded
    chain = [cfg.teacher.model, *cfg.tinyclip.progressive, cfg.model]
    for big, small in zip(chain, chain[1:]):
        for tower in ("vision", "text"):
            b, s = getattr(big, tower), getattr(small, tower)
            over = [k for k in ("layers", "width", "heads", "mlp") if getattr(s, k) > getattr(b, k)]
            if s.width // s.heads > b.width // b.heads:
                over.append("head width (width / heads)")
            if over:
                raise ConfigError(f"tinyclip: manual inheritance needs a smaller student, but its {tower} "
                                  f"{', '.join(over)} exceed the model it inherits from")
        if small.patch_size != big.patch_size or small.projection_dim > big.projection_dim:
            raise ConfigError("tinyclip: manual inheritance needs the same patch_size and a projection_dim no "
                              "larger than the model it inherits from")


def _teacher_dir(cfg: TinyClipRecipe, run_dir: Path, trainer: Any, text: str) -> tuple[Path | None, Any]:
    """The teacher's saved-model directory: a local one, or the teacher stage's (trained or reused)."""
    if cfg.teacher.model.local_dir:
        return Path(cfg.teacher.model.local_dir), None
    recipe = ClipRecipe(seed=cfg.teacher.seed, data=cfg.data, model=cfg.teacher.model, train=cfg.teacher.loop)
    stage = run_clip(recipe, run_dir, trainer, text, stage=None if cfg.teacher_only else "teacher")
    return (None if stage.stopped else stage.run_dir / "model"), stage


@torch.no_grad()
def _teacher_scores(teacher: Any, task: Any) -> dict[str, float]:
    """The teacher's val / test metrics on this recipe's splits (for the premise and the target)."""
    from kdforge.tasks.vision_language.task import ClipModule
    from kdforge.train.distributed import DistEnv

    module = ClipModule(teacher)
    val = task.evaluate(module, "val", DistEnv())
    test = task.evaluate(module, "test", DistEnv())
    return {"teacher_val_zeroshot_top1": val["zeroshot_top1"],
            **{f"teacher_test_{k}": v for k, v in test.items()}}


def run_tinyclip(cfg: TinyClipRecipe, run_dir: str | Path, trainer: Any = None,
                 config_text: str = "") -> dict[str, Any]:
    """Teacher (stage or local), then each progressive stage and the final student with TinyCLIP."""
    from kdforge.tasks.vision_language import require_transformers
    from kdforge.tasks.vision_language.inherit import inherit_weights
    from kdforge.tasks.vision_language.models import build_clip, count_parameters, load_clip
    from kdforge.tasks.vision_language.task import ClipModule, VisionLanguageTask
    from kdforge.tasks.vision_language.tokenizer import load_tokenizer

    require_transformers()
    run_dir = Path(run_dir)
    for m in [*cfg.tinyclip.progressive, cfg.model]:
        m.check("model")
    _check_inheritable(cfg)
    t_dir, stage = _teacher_dir(cfg, run_dir, trainer, config_text)
    if cfg.teacher_only or t_dir is None:
        return stage.result
    teacher = load_or_build(ClipModelConfig(local_dir=str(t_dir), context_length=cfg.model.context_length),
                            cfg.data.size, "teacher.model").clip.eval().requires_grad_(False)
    tokenizer = load_tokenizer(t_dir)
    tc = teacher.config.text_config
    special = (tc.pad_token_id or 0, tc.bos_token_id, tc.eos_token_id)
    splits = make_splits(cfg.data)
    args = cfg.tinyclip
    if args.inherit == "auto":
        return _run_auto(cfg, run_dir, trainer, config_text, teacher, tokenizer, splits)
    chain = [*args.progressive, cfg.model]
    previous, result = teacher, {}
    for i, m in enumerate(chain):
        final = i == len(chain) - 1
        context = min(m.context_length, tc.max_position_embeddings)
        torch.manual_seed(cfg.seed)
        student = build_clip(m, tc.vocab_size, cfg.data.size, special)
        inherited = {}
        if args.inherit == "manual":
            inherited = inherit_weights(previous, student)
        module = ClipModule(student, teacher, clip_weight=args.clip, distill_weight=args.distill,
                            teacher_scale=args.teacher_scale)
        task = VisionLanguageTask(module, splits, tokenizer, context, cfg.train.batch_size, cfg.seed)
        extra = _teacher_scores(teacher, task)
        task.target_top1 = 0.9 * extra["teacher_val_zeroshot_top1"]
        task.extra_result = {**extra, "teacher_params": count_parameters(teacher), "inherited_layers": inherited,
                             "stage": i + 1, "stages": len(chain)}
        loop = cfg.train
        if not final and args.progressive_epochs:
            loop = LoopConfig(**{**vars(cfg.train), "epochs": args.progressive_epochs})
        out = run_stage(run_dir, None if final else f"progressive{i + 1}", loop_settings(loop, cfg.seed, trainer),
                        task, config_text)
        if out.stopped:
            return out.result
        if not (out.run_dir / "model" / "config.json").is_file():
            save_model(out.module.eval_model(), tokenizer, out.run_dir / "model")
        previous = load_clip(out.run_dir / "model") if not final else out.module.eval_model()
        result = out.result
    if not result:
        raise KdforgeError("tinyclip: no student stage ran")
    return result


def _run_auto(cfg: TinyClipRecipe, run_dir: Path, trainer: Any, text: str, teacher: Any, tokenizer: Any,
              splits: dict[str, Any]) -> dict[str, Any]:
    """Stage `prune`: a full copy of the teacher under gates, TinyCLIP's loss + the Lagrangian; then the
    gates are fused once into a smaller model that trains `train.epochs` in `run_dir` (a new stage, so a
    fresh optimizer and schedule)."""
    from kdforge.tasks.vision_language import require_transformers
    from kdforge.tasks.vision_language.l0 import ClipMasks, MaskedClipModule, fuse, masked_structure
    from kdforge.tasks.vision_language.models import count_parameters
    from kdforge.tasks.vision_language.task import ClipModule, VisionLanguageTask

    args, au = cfg.tinyclip, cfg.tinyclip.auto
    tc = teacher.config.text_config
    context = min(cfg.model.context_length, tc.max_position_embeddings)
    weights = {"clip_weight": args.clip, "distill_weight": args.distill, "teacher_scale": args.teacher_scale}
    torch.manual_seed(cfg.seed)
    full = require_transformers().CLIPModel(teacher.config)
    full.load_state_dict(teacher.state_dict())
    full.requires_grad_(True)
    steps = max(1, cfg.data.num_train // cfg.train.batch_size) * au.prune_epochs
    masks = ClipMasks(full, au.mask_init, au.mask_gain)
    module = MaskedClipModule(full, teacher, masks, au.target_sparsity, int(au.ramp * steps), au.lambda_init,
                              au.lambda_lr, **weights)
    task = VisionLanguageTask(module, splits, tokenizer, context, cfg.train.batch_size, cfg.seed)
    extra = {**_teacher_scores(teacher, task), "teacher_params": count_parameters(teacher)}
    task.extra_result = {**extra, "target_sparsity": au.target_sparsity}
    loop = LoopConfig(**{**vars(cfg.train), "epochs": au.prune_epochs})
    pruned = run_stage(run_dir, "prune", loop_settings(loop, cfg.seed, trainer), task, text)
    if pruned.stopped:
        return pruned.result
    trained = pruned.module
    with torch.no_grad():
        sparsity = float(trained.masks.expected_sparsity())
    student = fuse(trained.student, trained.masks)
    structure = masked_structure(trained.masks)
    task = VisionLanguageTask(ClipModule(student, teacher, **weights), splits, tokenizer, context,
                              cfg.train.batch_size, cfg.seed, target_top1=0.9 * extra["teacher_val_zeroshot_top1"])
    task.extra_result = {**extra, "target_sparsity": au.target_sparsity, "expected_sparsity_at_fusion": sparsity,
                         "kept_structure": structure}
    return run_stage(run_dir, None, loop_settings(cfg.train, cfg.seed, trainer), task, text).result


class TinyClip:
    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str, run_dir: Path) -> dict[str, Any]:
        cfg, trainer, text = parse_recipe(tree, source, TinyClipRecipe, method="tinyclip")
        cfg.check(source)
        return run_tinyclip(cfg, run_dir, trainer, text)


METHODS.register(
    "tinyclip", TinyClip, family="vision-language",
    paper="TinyCLIP: CLIP Distillation via Affinity Mimicking and Weight Inheritance (ICCV 2023)",
    summary="student CLIP matches the teacher's in-batch image<->text affinity distributions; initialised by "
            "manual weight inheritance (uniform layers, leading widths / heads); progressive multi-stage "
            "compression", task="vision-language")
