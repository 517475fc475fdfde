"""SAM (Spatial Alignment via Matching, card p09): a frozen image teacher -> an echo (binaural audio) student
for dense depth / semantic maps, on the dense package (`kdforge.tasks.dense.audio`, `.echo`).

The paper: an audio student (binaural spectrogram in, depth / segmentation / 3D out) learns from
a vision teacher's predictions (pseudo ground truth, the baseline), and SAM blocks at the deepest
student layers turn the audio features into a map with the teacher's spatial layout:

    T_i^k(l) = max_j p_i^k(l) . (W_i a_i(j))                      p_i^k (V_i x C): K learnable embeddings
    p_hat_i(l) = sum_k softmax_k(T_i^k(l)) p_i^k(l)
    p_bar_i  = MultiHead(query=p_hat_i, key=a_i, value=a_i) + p_hat_i      (fed to the decoder instead of a_i)
    L = L_p(student, teacher prediction) + lam sum_i L_f^i
    L_f^i = 1/V_i sum_j sum_{k' != k+} max(0, m - cos(v(j), a(k+)) + cos(v(j), a(k'))),
            k+ = argmax_k cos(v(j), a(k)),  m = 0.3

with K = 64 at the deepest block and K / 4 at each shallower one; L_p is the reverse Huber (berHu)
for depth and cross-entropy for semantic labels. The triplet reads the raw audio features a_i
(projected to the teacher's C) by default, p_bar_i with `triplet_on: aligned`. At test time only
the echo is used. Arms of the card's demo: `pseudo_gt` (bridge resize, no feature loss; the
paper's baseline), `mse` (bridge resize + MSE of the resized audio features against the teacher's
features, FitNet-style), SAM with K = 1 and full SAM (`bridge: sam`, `feature: triplet`).

Deviations (no official code exists; the card follows the paper text):
* data: procedural scenes (`kdforge.tasks.dense.scenes`) and their simulated echoes (a chirp
  emitter, `kdforge.tasks.dense.echo`) instead of Matterport3D / SoundSpaces panoramas; a 32 px
  perspective image instead of a panorama. The recipe's default hears with a line of 8 cosine
  microphones (0.1 m apart, facing up to +-70 degrees) and diffuse (rough) surfaces, 8 x 33 x 39
  log spectrograms, not the paper's binaural recording: on a development draw the binaural,
  coherent echo left the plain student at the audio-blind prior (test RMSE 0.794 vs the mean
  depth map's 0.808), the 8-microphone diffuse one below it (0.754). `data.echo: {}` is binaural.
* networks: small convolutional nets (the teacher a `MultiTaskNet` UNet trained on the ground
  truth, the student a 4-stage conv encoder + upsampling decoder) instead of ResNet-50 U-Net / DPT;
  the aligned levels are the teacher's encoder stages `enc3` (8 x 8) and `enc4` (4 x 4) ("SAM_3,4");
  the plain student resizes its audio features bilinearly to those grids.
* lam is not given by the paper (task-specific): chosen on a development draw; the semantic task
  has no auxiliary 0.2 CE head; no time-band patching of the spectrogram; no flips.
* teacher features: the stage outputs of the teacher's encoder (after the stage's last ReLU, as a
  ResNet stage's output in the paper's U-Net), so non-negative; `teacher_features: pre_relu` reads the
  same stage before that ReLU (signed, closer to a DPT token). The card's warm-up with L_p alone is
  `warmup_epochs`; its adjacent-negative switch "if the loss stalls" is the manual `neg: adjacent`
  (here the loss never stalls: it falls to ~0 within the first epoch). The card's oracle (the
  teacher's actual features in place of the embeddings) is `bridge: oracle`.
* the teacher's predictions and features of the training scenes are computed once (the teacher
  is frozen and the batches are not augmented), so a step runs the student only.

Recipe schema (`configs/methods/sam_audio.yaml`; `kdforge train configs/methods/sam_audio.yaml --out runs/x`)::

    method: sam_audio
    seed: int                          # the student's initialisation and batch order
    data: {tasks: [depth, semseg], size, num_train, num_val, num_test, max_objects, noise, seed,
           echo: {EchoConfig fields: channels, mic_spacing, scatter: coherent | diffuse, ...}}
    model: {width, depth}              # the audio student
    train: LoopConfig
    teacher: {model: {arch, width, depth}, loop: LoopConfig, seed, run}   # run: a finished teacher_only run
    teacher_only: bool
    sam_audio: {pseudo_gt, bridge: resize | sam | oracle, layers: [enc3, enc4], k, k_div, heads,
                feature: none | mse | triplet, lam, margin, neg: all | adjacent, triplet_on: raw | aligned,
                depth_loss: berhu | l1, teacher_features: post_relu | pre_relu, warmup_epochs}
    (bridge oracle feeds the teacher's own features of the image to the decoder, at
     training and test time: the card's upper-bound check, not an audio-only student)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdforge.config import to_dict
from kdforge.errors import ConfigError
from kdforge.methods.mtl_cskd import DenseModelConfig, TeacherSpec, _loop
from kdforge.registry import METHODS
from kdforge.tasks.common import LoopConfig
from kdforge.train.stages import loop_settings, parse_recipe, reuse_stage, run_stage

__all__ = ["AudioDataConfig", "SAMAudioArgs", "SAMAudioRecipe", "run_sam_audio"]

AUDIO_TASKS = ("depth", "semseg")


@dataclass
class AudioDataConfig:
    tasks: list[str] = field(default_factory=lambda: ["depth"])
    size: int = 32
    num_train: int = 400
    num_val: int = 0
    num_test: int = 200
    max_objects: int = 4
    noise: float = 0.02
    seed: int = 0
    echo: dict[str, Any] = field(default_factory=dict)      # EchoConfig fields


@dataclass
class AudioModelConfig:
    width: int = 16
    depth: int = 4


@dataclass
class SAMAudioArgs:
    pseudo_gt: bool = True           # train on the teacher's predictions (the paper's setting), else the ground truth
    bridge: str = "sam"              # resize (plain student) | sam | oracle (the teacher's features; upper bound)
    layers: list[str] = field(default_factory=lambda: ["enc3", "enc4"])   # teacher taps aligned (SAM_3,4)
    k: int = 64                      # K of the deepest block
    k_div: int = 4                   # K divided by this for each shallower block
    heads: int = 4                   # attention heads of the SAM block
    feature: str = "triplet"         # none | mse | triplet
    lam: float = 0.1                 # weight of the feature loss (per level)
    margin: float = 0.3
    neg: str = "all"                 # all | adjacent
    triplet_on: str = "raw"          # raw audio features | aligned (the SAM output)
    depth_loss: str = "berhu"        # berhu | l1
    teacher_features: str = "post_relu"   # the teacher's stage outputs (after ReLU) | pre_relu (before the last ReLU)
    warmup_epochs: int = 0           # epochs of L_p alone before the feature loss starts


@dataclass
class SAMAudioRecipe:
    method: str = "sam_audio"
    seed: int = 0
    data: AudioDataConfig = field(default_factory=AudioDataConfig)
    model: AudioModelConfig = field(default_factory=AudioModelConfig)
    train: LoopConfig = field(default_factory=lambda: _loop(15))
    teacher: TeacherSpec = field(default_factory=lambda: TeacherSpec(model=DenseModelConfig(width=16)))
    teacher_only: bool = False
    task_weights: dict[str, float] = field(default_factory=dict)
    sam_audio: SAMAudioArgs = field(default_factory=SAMAudioArgs)

    def check(self, source: str) -> None:
        from kdforge.losses.sam_audio import NEGATIVES
        from kdforge.tasks.dense.audio import BRIDGES, FEATURE_LOSSES, TEACHER_FEATURES
        from kdforge.tasks.dense.echo import EchoConfig
        from kdforge.tasks.dense.models import ARCHS

        d, a, t = self.data, self.sam_audio, self.teacher.model
        bad = [x for x in [*d.tasks, *self.task_weights] if x not in AUDIO_TASKS]
        if bad or not d.tasks:
            raise ConfigError(f"{source}: data.tasks: unknown task {bad[0] if bad else '(empty)'}; known: "
                              f"{', '.join(AUDIO_TASKS)}")
        if t.arch not in ARCHS or t.width < 1 or self.model.width < 1 or not 2 <= self.model.depth <= 5:
            raise ConfigError(f"{source}: teacher.model.arch must be one of {', '.join(ARCHS)} with width >= 1, and "
                              f"model.width >= 1, 2 <= model.depth <= 5")
        if d.size < 8 or d.size % 2 ** (t.depth - 1):
            raise ConfigError(f"{source}: data.size {d.size} must be >= 8 and divisible by the teacher's stride "
                              f"{2 ** (t.depth - 1)}")
        if min(d.num_train, d.num_test) < 1 or d.num_val < 0:
            raise ConfigError(f"{source}: data.num_train and data.num_test must be >= 1 and num_val >= 0")
        try:
            EchoConfig.from_mapping(d.echo)
        except Exception as err:            # noqa: BLE001  (the echo config's own one-line message)
            raise ConfigError(f"{source}: data.echo: {err}") from None
        stages = [int(x[3:]) if x.startswith("enc") and x[3:].isdigit() else 0 for x in a.layers]
        if not a.layers or any(not 1 <= s <= min(t.depth, self.model.depth) for s in stages) \
                or len(set(stages)) != len(stages):
            raise ConfigError(f"{source}: sam_audio.layers must be distinct teacher taps enc1..enc"
                              f"{min(t.depth, self.model.depth)}, got {a.layers}")
        if a.bridge not in BRIDGES:
            raise ConfigError(f"{source}: sam_audio.bridge must be one of {', '.join(BRIDGES)}, got {a.bridge!r}")
        if a.feature not in FEATURE_LOSSES:
            raise ConfigError(f"{source}: sam_audio.feature must be one of {', '.join(FEATURE_LOSSES)}, got "
                              f"{a.feature!r}")
        if a.neg not in NEGATIVES or a.triplet_on not in ("raw", "aligned") or a.depth_loss not in ("berhu", "l1"):
            raise ConfigError(f"{source}: sam_audio.neg must be all|adjacent, triplet_on raw|aligned, depth_loss "
                              f"berhu|l1; got {a.neg!r}, {a.triplet_on!r}, {a.depth_loss!r}")
        if a.teacher_features not in TEACHER_FEATURES or a.warmup_epochs < 0:
            raise ConfigError(f"{source}: sam_audio.teacher_features must be one of {', '.join(TEACHER_FEATURES)} and "
                              f"warmup_epochs >= 0; got {a.teacher_features!r}, {a.warmup_epochs}")
        if a.triplet_on == "aligned" and a.bridge != "sam":
            raise ConfigError(f"{source}: sam_audio.triplet_on aligned needs bridge: sam")
        if a.k < 1 or a.k_div < 1 or a.heads < 1 or a.lam < 0 or a.margin < 0:
            raise ConfigError(f"{source}: sam_audio.k, k_div, heads must be >= 1 and lam, margin >= 0")
        self.train.check(f"{source}: train")
        self.teacher.loop.check(f"{source}: teacher.loop")


def _data(cfg: SAMAudioRecipe) -> tuple[Any, Any, Any]:
    """(train, test, val or None): disjoint scene streams of one data seed."""
    from kdforge.tasks.dense.echo import EchoConfig, procedural_echo_split

    d = cfg.data
    echo = EchoConfig.from_mapping(d.echo)
    make = [procedural_echo_split(n, d.seed * 3 + k, d.size, 1, d.max_objects, d.noise, tuple(d.tasks), echo)
            for k, n in enumerate((d.num_train, d.num_test, d.num_val)) if n > 0]
    return make[0], make[1], (make[2] if d.num_val else None)


def _dense(echo_data: Any) -> Any:
    from kdforge.tasks.dense.scenes import DenseData

    return DenseData(echo_data.images, echo_data.targets, echo_data.num_classes, echo_data.class_names,
                     echo_data.scenes)


def _teacher_identity(cfg: SAMAudioRecipe) -> dict[str, Any]:
    """What a shared teacher must match: the scenes and its own training (the echo settings do not reach it)."""
    data = {k: v for k, v in to_dict(cfg.data).items() if k != "echo"}
    return {"data": data, "teacher": {"model": to_dict(cfg.teacher.model), "seed": cfg.teacher.seed,
                                                    "loop": to_dict(cfg.teacher.loop)}}


def level_k(cfg: SAMAudioArgs, stages: list[int]) -> dict[int, int]:
    """K per aligned stage: `k` at the deepest, divided by `k_div` per shallower stage (at least 1)."""
    deepest = max(stages)
    return {s: max(1, cfg.k // cfg.k_div ** (deepest - s)) for s in stages}


def run_sam_audio(cfg: SAMAudioRecipe, run_dir: str | Path, trainer: Any = None,
                  config_text: str = "") -> dict[str, Any]:
    """Teacher stage (an image UNet on the ground truth, or `teacher.run`), then the audio student into `run_dir`."""
    from kdforge.methods.mtl_cskd import _model
    from kdforge.tasks.dense.audio import AudioDenseNet, AudioDenseTask
    from kdforge.tasks.dense.metrics import require_torchmetrics
    from kdforge.tasks.dense.models import task_channels
    from kdforge.tasks.dense.task import DenseTask, normalise

    require_torchmetrics()
    train, test, val = _data(cfg)
    tasks, a = list(cfg.data.tasks), cfg.sam_audio
    classes = train.num_classes

    def teacher_task() -> DenseTask:
        net = _model(cfg.teacher.model, tasks, classes, cfg.teacher.seed)
        return DenseTask(net, _dense(train), _dense(test), cfg.teacher.loop.batch_size, cfg.teacher.seed,
                         task_weights=cfg.task_weights, val=_dense(val) if val is not None else None)

    t_settings = loop_settings(cfg.teacher.loop, cfg.teacher.seed, trainer)
    if cfg.teacher_only:
        return run_stage(run_dir, None, t_settings, teacher_task(), config_text).result
    if cfg.teacher.run:
        stage = reuse_stage(cfg.teacher.run, SAMAudioRecipe, cfg, _teacher_identity, "sam_audio", "teacher.run",
                            t_settings, teacher_task(), "teacher_only=true")
    else:
        stage = run_stage(run_dir, "teacher", t_settings, teacher_task(), config_text)
        if stage.stopped:
            return stage.result
    teacher = stage.module.eval_model().cpu()
    extra = {f"teacher_{k}": v for k, v in stage.result.items() if k.startswith("test_") and k != "test_images"}
    stages = [int(x[3:]) for x in a.layers]
    with torch.no_grad():       # the teacher taps' shapes (C, h, w)
        from kdforge.models.taps import FeatureTap

        with FeatureTap(teacher, a.layers, detach=True) as tap:
            teacher.eval()
            teacher(normalise(train.images[:1]))
            shapes = {s: tuple(tap.features[f"enc{s}"].shape[1:]) for s in stages}
    torch.manual_seed(cfg.seed)
    student = AudioDenseNet(task_channels(tasks, classes), shapes, cfg.data.size, train.spectrograms.shape[1],
                            cfg.model.width, cfg.model.depth, a.bridge, level_k(a, stages), a.heads)
    task = AudioDenseTask(student, train, test, cfg.train.batch_size, cfg.seed, teacher=teacher,
                          pseudo_gt=a.pseudo_gt, feature=a.feature, lam=a.lam, margin=a.margin, neg=a.neg,
                          triplet_on=a.triplet_on, depth_loss=a.depth_loss, task_weights=cfg.task_weights, val=val,
                          extra_result=extra, teacher_features=a.teacher_features, warmup_epochs=a.warmup_epochs)
    return run_stage(run_dir, None, loop_settings(cfg.train, cfg.seed, trainer), task, config_text).result


class SAMAudio:
    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str, run_dir: Path) -> dict[str, Any]:
        cfg, trainer, text = parse_recipe(tree, source, SAMAudioRecipe, method="sam_audio")
        cfg.check(source)
        return run_sam_audio(cfg, run_dir, trainer, text)


METHODS.register(
    "sam_audio", SAMAudio, family="multimodal",
    paper="Spatial Alignment via Matching: vision-to-audio dense distillation (SAM, DAPS benchmark)",
    summary="image teacher -> echo-spectrogram student for depth / semantic maps: pseudo-GT + SAM blocks (K learnable "
            "spatial embeddings in the teacher's layout, chosen by max-matching the audio, refined by attention) "
            "and a loose triplet feature loss", task="dense")
