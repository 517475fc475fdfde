"""Echo "audio" of a rendered scene: what a chirping emitter at the camera would hear back, BatVision-style.

Vision-to-audio dense distillation (SAM, card p09) needs an audio view of the same scene whose
images and dense targets the teacher sees. This module computes it from the rendered geometry
instead of recording it: an emitter at the camera sends a short linear chirp; the surface point
seen by each pixel (its ray scaled by the pixel's depth) sends it back to `channels` microphones on
a horizontal line through the camera (spacing `mic_spacing`). Each pixel's echo

* is delayed by (|emitter -> point| + |point -> microphone|) / speed_of_sound,
* is scaled by cos(incidence) / (r_emit * r_mic) (spherical spreading, 1/r^2 when both coincide;
  the cosine from the rendered normals: walls facing the camera return more than slanted ones),
  by a microphone directivity (each outer microphone faces outwards by `mic_angle`, so the
  channels differ in level, not only in delay), and by 1 / pixel count (the level does not depend
  on the resolution),
* and surfaces beyond `max_range` (or without a depth) are silent.

The echoes are summed as an impulse response (fractional delays by linear interpolation, one
`scatter_add_` for all pixels), convolved with the chirp (FFT), seeded Gaussian noise is added
and `torch.stft` turns each channel into a log-magnitude spectrogram (channels, n_fft // 2 + 1,
frames): a shape unlike the image's, as the student of a cross-modal method expects.
The sum is coherent (smooth, specular surfaces): a large surface spread over many delays mostly
cancels inside the chirp's band, so its echo comes from its nearest part and its edges, and a
coarse pixel grid adds faint spurious echoes (~20 dB below the main ones at 32 px).
`scatter: diffuse` models rough surfaces instead: each pixel's echo gets a seeded random sign, so
the echoes add in power (incoherently) and every surface is heard over its whole range of delays.

Units: scene units are metres (image side = 1 unit at depth 1 for `focal` = 1). Pinhole camera:
pixel (u, v) in [0, 1] looks along ((u - 0.5) / focal, (v - 0.5) / focal, 1); rendered depth is
the distance along the view axis. `procedural_echo_split` renders a seeded split with its images,
dense targets and spectrograms.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from kdforge.errors import KdforgeError
from kdforge.tasks.base import seeded_generator
from kdforge.tasks.dense.scenes import KINDS, TASKS, Scene, render_all, sample_scenes

__all__ = ["EchoConfig", "EchoData", "chirp", "echo_spectrograms", "microphone_positions", "procedural_echo_split",
           "received_signals", "surface_points"]


SCATTER = ("coherent", "diffuse")


@dataclass
class EchoConfig:
    """Emitter, microphones and spectrogram settings (defaults: 2 x 33 x 39 spectrograms, surfaces up to 6 m)."""

    sample_rate: int = 16_000          # Hz
    f_low: float = 1_000.0             # chirp start frequency, Hz
    f_high: float = 7_000.0            # chirp end frequency, Hz (< sample_rate / 2)
    chirp_s: float = 0.003             # chirp duration, s (Hann-windowed)
    max_range: float = 6.0             # farthest surface that echoes, scene units (m); sets the recording length
    speed_of_sound: float = 343.0      # scene units (m) per second
    channels: int = 2                  # microphones on a horizontal line centred on the emitter
    mic_spacing: float = 0.2           # distance between neighbouring microphones, scene units
    mic_angle: float = 45.0            # degrees the outermost microphones face away from the view axis
    directivity: float = 0.5           # 0 omnidirectional .. 1 cosine pattern
    focal: float = 1.0                 # pinhole focal length in image sides (1 -> ~53 degree field of view)
    noise: float = 1e-5                # std of the added Gaussian noise (the chirp's peak amplitude is 1)
    n_fft: int = 64
    hop: int = 16
    log_eps: float = 1e-6              # spectrogram = log(|STFT| + log_eps)
    scatter: str = "coherent"          # coherent (specular sum) | diffuse (seeded random sign per pixel)

    def __post_init__(self) -> None:
        checks = [
            ("sample_rate", self.sample_rate > 0, "> 0"),
            ("f_low", 0 < self.f_low < self.f_high, f"in (0, f_high={self.f_high})"),
            ("f_high", self.f_high < self.sample_rate / 2, f"< sample_rate / 2 = {self.sample_rate / 2:g}"),
            ("chirp_s", self.chirp_s * self.sample_rate >= 4, f">= 4 samples ({4 / max(self.sample_rate, 1):g} s)"),
            ("max_range", self.max_range > 0, "> 0"),
            ("speed_of_sound", self.speed_of_sound > 0, "> 0"),
            ("channels", isinstance(self.channels, int) and self.channels >= 1, "an integer >= 1"),
            ("mic_spacing", self.mic_spacing > 0 or (self.mic_spacing == 0 and self.channels == 1),
             "> 0 (0 only with one channel)"),
            ("mic_angle", 0 <= self.mic_angle <= 90, "in [0, 90]"),
            ("directivity", 0 <= self.directivity <= 1, "in [0, 1]"),
            ("focal", self.focal > 0, "> 0"),
            ("noise", self.noise >= 0, ">= 0"),
            ("n_fft", isinstance(self.n_fft, int) and self.n_fft >= 8, "an integer >= 8"),
            ("hop", isinstance(self.hop, int) and 1 <= self.hop <= self.n_fft, f"an integer in [1, {self.n_fft}]"),
            ("log_eps", self.log_eps > 0, "> 0"),
            ("scatter", self.scatter in SCATTER, f"one of {', '.join(SCATTER)}"),
        ]
        for name, ok, need in checks:
            if not ok:
                raise KdforgeError(f"echo config: {name} must be {need}, got {getattr(self, name)!r}")
        if self.n_fft > self.num_samples:
            raise KdforgeError(f"echo config: n_fft={self.n_fft} exceeds the recording ({self.num_samples} samples); "
                               "raise max_range or lower n_fft")

    @classmethod
    def from_mapping(cls, values: Mapping[str, object] | None) -> EchoConfig:
        """From a config mapping; an unknown key is a one-line error."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise KdforgeError(f"echo config: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)

    @property
    def chirp_samples(self) -> int:
        return int(round(self.chirp_s * self.sample_rate))

    @property
    def num_samples(self) -> int:
        """Recording length: the round trip to max_range (plus the lateral microphone offset) and one chirp."""
        span = self.mic_spacing * (self.channels - 1) / 2
        return int(math.ceil((2 * self.max_range + span) / self.speed_of_sound * self.sample_rate)) + self.chirp_samples

    @property
    def num_frames(self) -> int:
        return 1 + self.num_samples // self.hop


def chirp(cfg: EchoConfig) -> Tensor:
    """The emitted signal: a Hann-windowed linear sweep f_low -> f_high, peak amplitude <= 1, (chirp_samples,)."""
    n = cfg.chirp_samples
    t = torch.arange(n, dtype=torch.float64) / cfg.sample_rate
    sweep = (cfg.f_high - cfg.f_low) / (2 * cfg.chirp_s)
    phase = 2 * math.pi * (cfg.f_low * t + sweep * t ** 2)
    return (torch.hann_window(n, periodic=False, dtype=torch.float64) * torch.sin(phase)).float()


def microphone_positions(cfg: EchoConfig) -> tuple[Tensor, Tensor]:
    """(positions (C, 3), facing unit vectors (C, 3)): a line along x through the emitter at the origin.

    Microphone i sits at x = (i - (C - 1) / 2) * spacing; it faces forward (+z) turned towards its
    side in proportion to its offset, the outermost ones by `mic_angle` (a centred one faces forward).
    """
    offset = torch.arange(cfg.channels, dtype=torch.float32) - (cfg.channels - 1) / 2
    pos = torch.zeros(cfg.channels, 3)
    pos[:, 0] = offset * cfg.mic_spacing
    half = (cfg.channels - 1) / 2
    turn = (offset / half if half else offset) * math.radians(cfg.mic_angle)
    facing = torch.stack([turn.sin(), torch.zeros_like(turn), turn.cos()], dim=1)
    return pos, facing


def surface_points(depth: Tensor, focal: float) -> Tensor:
    """(..., H, W, 3) camera-frame points (x right, y down, z forward) seen by each pixel of `depth` (..., H, W)."""
    h, w = depth.shape[-2:]
    v = ((torch.arange(h, dtype=depth.dtype) + 0.5) / h - 0.5) / focal
    u = ((torch.arange(w, dtype=depth.dtype) + 0.5) / w - 0.5) / focal
    yy, xx = torch.meshgrid(v, u, indexing="ij")
    rays = torch.stack([xx, yy, torch.ones_like(xx)], dim=-1)           # (H, W, 3), unit z component
    return depth.unsqueeze(-1) * rays


def _geometry(rendered: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, bool]:
    """Batched depth (N, H, W) and normals (N, 3, H, W) from a `render`/`render_all` result."""
    missing = [k for k in ("depth", "normals") if k not in rendered]
    if missing:
        raise KdforgeError(f"echo: the rendered scene lacks {', '.join(missing)} (pass render(...) or render_all(...))")
    depth, normals = rendered["depth"].float(), rendered["normals"].float()
    single = depth.dim() == 2
    if single:
        depth, normals = depth.unsqueeze(0), normals.unsqueeze(0)
    if depth.dim() != 3 or normals.shape != (depth.shape[0], 3, *depth.shape[1:]):
        raise KdforgeError(f"echo: expected depth (N, H, W) and normals (N, 3, H, W), got {tuple(depth.shape)} "
                           f"and {tuple(normals.shape)}")
    return depth, normals, single


def _impulse_responses(depth: Tensor, normals: Tensor, cfg: EchoConfig, seed: int = 0, first_scene: int = 0) -> Tensor:
    """(N, C, num_samples): every pixel's echo amplitude at its fractional delay (linear interpolation).

    `scatter: diffuse` gives every pixel a seeded random sign (phase 0 or pi; scene i of the batch
    by (seed, first_scene + i), the same for every microphone) and scales the amplitudes by
    sqrt(pixel count) instead of the count: the echoes then add in power, not in amplitude, so the
    expected power of a surface's echo is its area's sum of squared amplitudes over the pixel
    count, independent of the resolution, and large surfaces no longer cancel."""
    n, h, w = depth.shape
    points = surface_points(depth, cfg.focal).reshape(n, 1, h * w, 3)           # (N, 1, P, 3)
    r_emit = points.norm(dim=-1)                                                 # (N, 1, P)
    # render's normals use z towards the camera; in the camera frame (z forward) that is -z
    normal = normals.permute(0, 2, 3, 1).reshape(n, 1, h * w, 3) * torch.tensor([1.0, 1.0, -1.0])
    cos_in = -(normal * points).sum(-1) / r_emit.clamp_min(1e-9)                # facing the emitter -> 1
    mics, facing = microphone_positions(cfg)
    to_mic = mics.view(1, -1, 1, 3) - points                                     # (N, C, P, 3)
    r_mic = to_mic.norm(dim=-1)
    from_point = -to_mic / r_mic.unsqueeze(-1).clamp_min(1e-9)                   # microphone -> point, unit
    cos_mic = (from_point * facing.view(1, -1, 1, 3)).sum(-1)
    gain = (1 - cfg.directivity) + cfg.directivity * cos_mic.clamp_min(0.0)
    valid = (depth.reshape(n, 1, h * w) > 0) & (r_emit <= cfg.max_range)
    amp = torch.where(valid, cos_in.clamp_min(0.0) * gain / (r_emit * r_mic).clamp_min(1e-9), 0.0) / (h * w)
    if cfg.scatter == "diffuse":
        signs = torch.stack([torch.randint(0, 2, (h * w,), generator=seeded_generator(seed, 89, first_scene + i))
                             for i in range(n)]).float().mul_(2).sub_(1)
        amp = amp * signs.view(n, 1, h * w) * math.sqrt(h * w)
    length = cfg.num_samples
    delay = (r_emit + r_mic) / cfg.speed_of_sound * cfg.sample_rate             # samples, (N, C, P)
    delay = torch.where(valid, delay, 0.0).clamp(0, length - 2)                  # valid delays are < length - chirp
    first = delay.floor()
    frac = delay - first
    index = first.long()
    response = torch.zeros(n, cfg.channels, length)
    response.scatter_add_(2, index, amp * (1 - frac))
    response.scatter_add_(2, index + 1, amp * frac)
    return response


def received_signals(rendered: Mapping[str, Tensor], cfg: EchoConfig | None = None, seed: int = 0,
                     chunk: int = 64) -> Tensor:
    """The microphones' recordings (N, C, num_samples) (or (C, num_samples) for one scene), noise included.

    Vectorised over microphones and pixels (scenes in chunks of `chunk`, to bound memory): the
    impulse response is convolved with the chirp by FFT; scene i's noise is seeded by (seed, i)
    (and its diffuse signs, with `scatter: diffuse`, by (seed, i) too, in another stream).
    """
    cfg = cfg or EchoConfig()
    depth, normals, single = _geometry(rendered)
    response = torch.cat([_impulse_responses(depth[k:k + chunk], normals[k:k + chunk], cfg, seed, k)
                          for k in range(0, depth.shape[0], max(chunk, 1))])
    length = cfg.num_samples
    pulse = chirp(cfg)
    size = length + pulse.numel()
    spectrum = torch.fft.rfft(response, size) * torch.fft.rfft(pulse, size)
    signal = torch.fft.irfft(spectrum, size)[..., :length]
    if cfg.noise > 0:
        noise = torch.stack([torch.randn(cfg.channels, length, generator=seeded_generator(seed, 97, i))
                             for i in range(depth.shape[0])])
        signal = signal + cfg.noise * noise
    return signal[0] if single else signal


def echo_spectrograms(rendered: Mapping[str, Tensor], cfg: EchoConfig | None = None, seed: int = 0) -> Tensor:
    """Log-magnitude spectrograms (N, C, n_fft // 2 + 1, num_frames) of the echoes ((C, F, T) for one scene).

    Scene i of a batch draws its noise from (seed, i): a pure function of the arguments.
    """
    cfg = cfg or EchoConfig()
    signal = received_signals(rendered, cfg, seed)
    lead = signal.shape[:-1]
    spec = torch.stft(signal.reshape(-1, signal.shape[-1]), n_fft=cfg.n_fft, hop_length=cfg.hop,
                      window=torch.hann_window(cfg.n_fft), center=True, return_complex=True)
    return torch.log(spec.abs() + cfg.log_eps).reshape(*lead, *spec.shape[-2:])


@dataclass
class EchoData:
    """A paired split: uint8 images (N, 3, H, W), dense targets, echo spectrograms (N, C, F, T) and the scenes."""

    images: Tensor
    targets: dict[str, Tensor]
    spectrograms: Tensor
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    scenes: list[Scene] | None = None
    config: EchoConfig | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])


def procedural_echo_split(count: int, seed: int, size: int = 32, min_objects: int = 1, max_objects: int = 4,
                          noise: float = 0.02, tasks: tuple[str, ...] = ("depth", "semseg"),
                          cfg: EchoConfig | None = None) -> EchoData:
    """`count` seeded procedural scenes: their images, the `tasks` targets and the echo spectrograms of each."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise KdforgeError(f"echo data: unknown task(s) {unknown or '(none given)'}; known: {', '.join(TASKS)}")
    cfg = cfg or EchoConfig()
    scenes = sample_scenes(count, seed, min_objects, max_objects)
    maps = render_all(scenes, size, noise)
    spectrograms = echo_spectrograms(maps, cfg, seed)
    return EchoData(maps["image"], {t: maps[t] for t in tasks}, spectrograms, len(KINDS) + 1,
                    ["background", *KINDS], scenes, cfg)
