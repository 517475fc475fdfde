"""Procedural multimodal action clips: one scene description rendered as RGB frames, optical flow and audio.

A clip's action is `verb * nouns + noun`. The scene: an object whose colour names the noun moves
across a textured background in the direction the verb names, while the camera shakes. Each
modality carries a different part of the label, as in egocentric video:

* `rgb` (3, T, S, S): the object's colour (the noun) is plain to see on a low-contrast
  (`background`) texture; its motion (the verb) is a small displacement (`speed` px per frame)
  buried under camera shake (`shake`) and pixel noise,
  so an RGB-only model recovers the verb only partly;
* `flow` (2, T, S, S): the motion field between frames: the object's own displacement (the verb,
  clear) plus `flow_shake` times the camera's (0: stabilised flow), no colour, so the noun is invisible;
* `audio` (1, F, A): a spectrogram whose class template (a frequency band per noun, a rhythm per
  verb) has amplitude `audio_snr` under unit noise: a weak modality.

The clips of a split are a pure function of (seed, split): `train`, `val` and `test` draw from
their own streams. `label_noise` replaces that fraction of the *training* labels by a random
class (annotation noise; `val` and `test` keep the true action). The training split is cut into
the teachers' part and a held-out part (`holdout_fraction`, the last clips) on which the
modality weights are estimated (the teachers never train on it); the student trains on all of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from kdforge.errors import ConfigError, KdforgeError
from kdforge.tasks.base import seeded_generator

__all__ = ["MODALITIES", "ClipData", "ClipSpec", "procedural_clips", "split_holdout"]

MODALITIES = ("rgb", "flow", "audio")
_SPLIT_IDS = {"train": 1, "val": 2, "test": 3}
_DIRECTIONS = ((0.0, 1.0), (0.0, -1.0), (1.0, 0.0), (-1.0, 0.0), (0.7071, 0.7071), (-0.7071, -0.7071),
               (0.7071, -0.7071), (-0.7071, 0.7071))     # (dy, dx) of each verb


@dataclass
class ClipSpec:
    """What the procedural scene looks like (the recipe's `data` section), or where a user's clips are.

    With `format: folder` the clips come from `root` (kdforge.tasks.video.folders); `verbs` and
    `nouns` are then the data set's class counts and `frames`, `size`, `audio_bins`, `audio_steps`
    the shapes clips are sampled to; the scene and split-size fields are unused.
    """

    verbs: int = 4
    nouns: int = 3
    frames: int = 8
    size: int = 16
    audio_bins: int = 12
    audio_steps: int = 16
    object_size: float = 4.0
    speed: float = 0.5            # object px per frame (the verb's signal in RGB)
    shake: float = 1.5            # camera shake (px, per frame, RGB only; flow sees it as global motion)
    background: float = 0.5       # contrast of the RGB background texture
    rgb_noise: float = 0.25
    colour_jitter: float = 0.15
    flow_noise: float = 0.3
    flow_shake: float = 0.0       # the camera motion left in the flow (0: stabilised flow)
    audio_snr: float = 0.6
    label_noise: float = 0.0      # fraction of training labels replaced by a random class
    num_train: int = 1200
    num_val: int = 400
    num_test: int = 600
    holdout_fraction: float = 0.3
    seed: int = 0
    format: str = "procedural"    # procedural | folder (a user's clips: kdforge.tasks.video.folders)
    root: str = ""                # folder: root with train.csv / val.csv / test.csv and one folder per clip
    flow_bound: float = 20.0      # folder: the displacement (px) that 8-bit flow value 255 stands for

    @property
    def num_classes(self) -> int:
        return self.verbs * self.nouns

    def check(self, where: str = "data") -> None:
        if self.format not in ("procedural", "folder"):
            raise ConfigError(f"{where}.format must be procedural or folder, got {self.format!r}")
        if self.format == "folder" and not self.root:
            raise ConfigError(f"{where}.root must name the clip folder when {where}.format is folder")
        if self.flow_bound <= 0:
            raise ConfigError(f"{where}.flow_bound must be > 0, got {self.flow_bound}")
        if self.format == "procedural" and not 1 <= self.verbs <= len(_DIRECTIONS):
            raise ConfigError(f"{where}.verbs must be in 1..{len(_DIRECTIONS)}, got {self.verbs}")
        if self.nouns < 1 or self.num_classes < 2:
            raise ConfigError(f"{where}: need nouns >= 1 and verbs * nouns >= 2, got {self.verbs} x {self.nouns}")
        if self.frames < 2 or self.size < 8 or self.audio_bins < 2 or self.audio_steps < 2:
            raise ConfigError(f"{where}: need frames >= 2, size >= 8, audio_bins >= 2 and audio_steps >= 2")
        if min(self.num_train, self.num_val, self.num_test) < 1:
            raise ConfigError(f"{where}: num_train, num_val and num_test must be >= 1")
        if not 0 < self.holdout_fraction < 1:
            raise ConfigError(f"{where}.holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if not 0 <= self.label_noise < 1:
            raise ConfigError(f"{where}.label_noise must be in [0, 1), got {self.label_noise}")
        if min(self.speed, self.shake, self.rgb_noise, self.flow_noise, self.audio_snr, self.colour_jitter,
               self.background, self.flow_shake) < 0:
            raise ConfigError(f"{where}: speed, shake, background, noises, flow_shake, colour_jitter and audio_snr "
                              "must be >= 0")


@dataclass
class ClipData:
    """One split: every modality's clips (float, (N, ...)), the labels trained on and the true actions."""

    modalities: dict[str, Tensor]
    labels: Tensor
    true_labels: Tensor
    num_classes: int
    verbs: int = 0
    nouns: int = 0
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: Tensor) -> ClipData:
        return ClipData({k: v[index] for k, v in self.modalities.items()}, self.labels[index],
                        self.true_labels[index], self.num_classes, self.verbs, self.nouns, self.names)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape[1:]) for k, v in self.modalities.items()}


def _palette(nouns: int) -> Tensor:
    """`nouns` well separated object colours (hues round the colour wheel)."""
    hues = torch.arange(nouns, dtype=torch.float32) / nouns
    k = (torch.tensor([5.0, 3.0, 1.0]).view(1, 3) + hues.view(-1, 1) * 6) % 6
    return 0.9 - 0.8 * torch.clamp(torch.minimum(k, 4 - k), 0, 1)          # (nouns, 3) in [0.1, 0.9]


def _square(size: int, cy: Tensor, cx: Tensor, side: float) -> Tensor:
    """Soft (anti-aliased) masks (N, T, S, S) of squares of `side` px centred at (cy, cx) (N, T), wrapping round."""
    c = torch.arange(size, dtype=torch.float32) + 0.5

    def along(centre: Tensor) -> Tensor:
        d = (c.view(1, 1, -1) - centre.unsqueeze(-1)) % size
        d = torch.minimum(d, size - d)                          # circular distance
        return (side / 2 + 0.5 - d).clamp(0, 1)

    return along(cy).unsqueeze(-1) * along(cx).unsqueeze(-2)


def _audio_templates(spec: ClipSpec) -> Tensor:
    """(classes, F, A) spectrogram templates: a frequency band per noun, a rhythm (beat period) per verb."""
    f = torch.arange(spec.audio_bins, dtype=torch.float32)
    a = torch.arange(spec.audio_steps, dtype=torch.float32)
    out = torch.empty(spec.num_classes, spec.audio_bins, spec.audio_steps)
    for verb in range(spec.verbs):
        beat = (torch.cos(2 * math.pi * a / (2 + verb)) > 0).float()
        for noun in range(spec.nouns):
            centre = (noun + 0.5) * spec.audio_bins / spec.nouns
            band = torch.exp(-0.5 * ((f - centre) / max(1.0, spec.audio_bins / (3 * spec.nouns))) ** 2)
            out[verb * spec.nouns + noun] = band.view(-1, 1) * beat.view(1, -1)
    return out - out.mean(dim=(1, 2), keepdim=True)


def procedural_clips(spec: ClipSpec, split: str) -> ClipData:
    """The `split` (train | val | test) of the scene `spec` (a pure function of spec.seed and split)."""
    if split not in _SPLIT_IDS:
        raise KdforgeError(f"unknown clip split {split!r} (train, val or test)")
    spec.check()
    n = {"train": spec.num_train, "val": spec.num_val, "test": spec.num_test}[split]
    g = seeded_generator(spec.seed, 31, _SPLIT_IDS[split])
    t_len, s = spec.frames, spec.size
    verb = torch.randint(spec.verbs, (n,), generator=g)
    noun = torch.randint(spec.nouns, (n,), generator=g)
    action = verb * spec.nouns + noun
    direction = torch.tensor(_DIRECTIONS[: spec.verbs])[verb]                       # (n, 2) (dy, dx)
    t = torch.arange(t_len, dtype=torch.float32)
    start = torch.rand(n, 2, generator=g) * s
    object_pos = start.unsqueeze(1) + spec.speed * direction.unsqueeze(1) * t.view(1, -1, 1)   # (n, T, 2)
    camera = spec.shake * torch.randn(n, t_len, 2, generator=g)
    camera = camera - camera[:, :1]                                                   # first frame unshaken
    seen = object_pos - camera                                                        # where the RGB frame shows it
    # RGB: a static smooth background (seen through the shaking camera) + the noun-coloured square + noise
    low = torch.rand(n, 3, 4, 4, generator=g)
    background = 0.5 + spec.background * (
        torch.nn.functional.interpolate(low, size=(s, s), mode="bilinear", align_corners=False) - 0.5)
    shift = (-camera).round().long()
    frames = []
    for k in range(t_len):             # the camera moves the background (whole pixels) and the object (exactly)
        bg = torch.stack([torch.roll(background[i], (int(shift[i, k, 0]), int(shift[i, k, 1])), (1, 2))
                          for i in range(n)])
        frames.append(bg)
    bg = torch.stack(frames, 2)                                                      # (n, 3, T, S, S)
    colour = _palette(spec.nouns)[noun] + spec.colour_jitter * torch.randn(n, 3, generator=g)
    mask = _square(s, seen[..., 0], seen[..., 1], spec.object_size).unsqueeze(1)     # (n, 1, T, S, S)
    rgb = bg * (1 - mask) + colour.view(n, 3, 1, 1, 1) * mask
    rgb = rgb + spec.rgb_noise * torch.randn(rgb.shape, generator=g)
    # flow: per pixel the displacement from the previous frame (object: its own motion minus the camera's,
    # background: minus the camera's), first frame zero, plus noise
    cam_step = torch.cat([torch.zeros(n, 1, 2), camera[:, 1:] - camera[:, :-1]], 1)  # (n, T, 2)
    obj_step = torch.cat([torch.zeros(n, 1, 2), (spec.speed * direction).unsqueeze(1).expand(n, t_len - 1, 2)], 1)

    def as_field(step: Tensor) -> Tensor:
        return step.permute(0, 2, 1).reshape(n, 2, t_len, 1, 1)

    flow = -spec.flow_shake * as_field(cam_step) + as_field(obj_step) * mask
    flow = flow + spec.flow_noise * torch.randn(n, 2, t_len, s, s, generator=g)
    # audio: the class template at a random onset, amplitude audio_snr, under unit noise
    templates = _audio_templates(spec)[action]
    onset = torch.randint(spec.audio_steps, (n,), generator=g)
    templates = torch.stack([torch.roll(templates[i], int(onset[i]), 1) for i in range(n)])
    audio = (spec.audio_snr * templates + torch.randn(templates.shape, generator=g)).unsqueeze(1)
    labels = action.clone()
    if split == "train" and spec.label_noise > 0:
        flip = torch.rand(n, generator=g) < spec.label_noise
        labels[flip] = torch.randint(spec.num_classes, (int(flip.sum()),), generator=g)
    names = [f"v{v}-n{o}" for v in range(spec.verbs) for o in range(spec.nouns)]
    return ClipData({"rgb": (rgb - 0.5) / 0.3, "flow": flow, "audio": audio}, labels, action, spec.num_classes,
                    spec.verbs, spec.nouns, names)


def split_holdout(train: ClipData, fraction: float) -> tuple[Tensor, Tensor]:
    """(teacher positions, held-out positions) of the training split: the last `fraction` is held out."""
    n = len(train)
    held = max(1, min(n - 1, int(round(n * fraction))))
    return torch.arange(n - held), torch.arange(n - held, n)
