"""Procedural CIFAR-100-like data: 32x32 RGB, 100 fine classes in 20 superclasses, no download.

Why procedural: distillation needs a task where a teacher's soft labels carry information the
hard labels do not ("dark knowledge"). Here that structure is built in. Each superclass is a
pattern *family* (grating, rings, checker, star, blobs, plaid) with its own palette, base
orientation, base frequency and envelope shape; its fine classes are small perturbations of that
prototype: an orientation offset of a few degrees, a ~10% frequency step, a slight colour tint and
the angle of a small marker dot. The offsets are evenly spaced (in a random order), so siblings
are ordered along each cue and a sibling's "neighbours" are well defined.

Every sample renders its class template under nuisance (translation, scale, rotation jitter,
random phase, colour jitter, a cluttered background with distractor gabors, occlusion, pixel
noise), and the fine-class cues themselves are jittered per sample by about one sibling spacing
(the marker is sometimes missing). Neighbouring fine classes therefore overlap: the Bayes
posterior spreads over siblings, superclasses remain easy, no model reaches 100%, and most
errors stay within the superclass.

Generation is vectorised in torch (chunks of a few thousand images), deterministic in `seed`
(class templates from the seed; train and test drawn from independent streams of it) and cached
on disk keyed by every generation parameter plus `VERSION`.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Any

import torch
from torch import Tensor

from kdforge.data.base import ImageTensors
from kdforge.data.cache_dir import cached_split
from kdforge.errors import KdforgeError
from kdforge.registry import DATASETS

# Bump whenever the generator's output changes, so old caches are never mistaken for new data.
VERSION = 1
NAME = "procedural_cifar"
FAMILIES = ("grating", "rings", "checker", "star", "blobs", "plaid")
_CHUNK = 4096

# Fine-class cue strengths (differences between sibling classes) ...
_FINE_ORIENT_SPREAD = 0.30   # rad, total spread of orientation offsets across siblings
_FINE_FREQ_SPREAD = 0.40     # log-frequency spread across siblings
_FINE_TINT = 0.10            # per-channel colour tint magnitude
# ... and the nuisance that masks them.
_SHIFT = 0.28                # translation, in half-image units (about +-4.5 px at 32x32)
_LOG_SCALE = 0.12            # object scale jitter (log-uniform half-width)
_ROT_JITTER = 0.06           # rad, std of rotation jitter
_NOISE = 0.05                # pixel noise std
_GAIN = 0.10                 # per-channel gain jitter (log std)
# Per-sample jitter of the fine-class cues themselves, on the order of the sibling spacing, so
# neighbouring fine classes overlap: the Bayes posterior is spread over siblings (soft labels
# then carry real information) and no model can reach 100%.
_FREQ_JITTER = 0.07          # log std of pattern frequency, independent of object scale
_TINT_JITTER = 0.06          # std of per-channel foreground colour noise
_MARK_JITTER = 0.45          # rad, std of the marker angle (sibling spacing is 2*pi/5 = 1.26)
_MARK_MISSING = 0.3          # probability that the marker is absent


def _derive_seed(*parts: Any) -> int:
    """A 63-bit seed from arbitrary parts, so streams (templates/train/test) are independent."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _unif(gen: torch.Generator, shape: tuple[int, ...], lo: float, hi: float) -> Tensor:
    return torch.rand(shape, generator=gen) * (hi - lo) + lo


def _centred_offsets(n: int, gen: torch.Generator) -> Tensor:
    """`n` evenly spaced offsets in [-0.5, 0.5] in random order, so siblings never coincide."""
    base = torch.linspace(-0.5, 0.5, n) if n > 1 else torch.zeros(1)
    return base[torch.randperm(n, generator=gen)]


def class_templates(seed: int, num_classes: int = 100, num_superclasses: int = 20) -> dict[str, Tensor]:
    """Per-class rendering parameters: superclass prototype plus a small fine-class perturbation."""
    per = num_classes // num_superclasses
    gen = torch.Generator().manual_seed(_derive_seed(NAME, VERSION, seed, "templates"))
    s_count = num_superclasses
    fam = (torch.arange(s_count) % len(FAMILIES))[torch.randperm(s_count, generator=gen)]
    theta = _unif(gen, (s_count,), 0.0, math.pi)
    freq = _unif(gen, (s_count,), 0.9, 1.8)          # cycles per object radius
    aspect = _unif(gen, (s_count,), 0.55, 0.85)      # elliptical envelope gives rings/stars an orientation
    c_fg = _unif(gen, (s_count, 3), 0.05, 0.95)
    c_bg = (1.0 - c_fg + _unif(gen, (s_count, 3), -0.25, 0.25)).clamp(0.0, 1.0)
    c_mark = _unif(gen, (s_count, 3), 0.0, 1.0)
    arms = torch.randint(3, 7, (s_count,), generator=gen).float()
    blobs = _unif(gen, (s_count, 3, 2), -0.55, 0.55)
    mark_phase = _unif(gen, (s_count,), 0.0, 2 * math.pi)

    o_theta = torch.stack([_centred_offsets(per, gen) for _ in range(s_count)])  # (S, per)
    o_freq = torch.stack([_centred_offsets(per, gen) for _ in range(s_count)])
    tint = torch.randn((s_count, per, 3), generator=gen)
    tint = tint / tint.norm(dim=-1, keepdim=True).clamp_min(1e-6) * _FINE_TINT
    mark_slot = torch.stack([torch.randperm(per, generator=gen) for _ in range(s_count)]).float()

    sup = torch.arange(num_classes) // per
    j = torch.arange(num_classes) % per
    return {
        "coarse": sup,
        "family": fam[sup],
        "theta": theta[sup] + _FINE_ORIENT_SPREAD * o_theta[sup, j],
        "freq": freq[sup] * torch.exp(_FINE_FREQ_SPREAD * o_freq[sup, j]),
        "aspect": aspect[sup],
        "c_fg": (c_fg[sup] + tint[sup, j]).clamp(0.0, 1.0),
        "c_bg": c_bg[sup],
        "c_mark": c_mark[sup],
        "arms": arms[sup],
        "blobs": blobs[sup],
        "mark_angle": mark_phase[sup] + 2 * math.pi * mark_slot[sup, j] / per,
    }


def _pattern(fam: int, u: Tensor, v: Tensor, rho: Tensor, k: Tensor, phase: Tensor, phase2: Tensor,
             arms: Tensor, blobs: Tensor) -> Tensor:
    """The family's pattern in [-1, 1] at object coordinates (u, v) (radius-1 object)."""
    two_pi = 2 * math.pi
    name = FAMILIES[fam]
    if name == "grating":
        return torch.cos(two_pi * k * u + phase)
    if name == "rings":
        return torch.cos(two_pi * k * rho + phase)
    if name == "checker":
        return torch.tanh(3.0 * torch.cos(math.pi * k * u + phase) * torch.cos(math.pi * k * v + phase2))
    if name == "star":
        ang = torch.atan2(v, u)
        return 0.65 * torch.cos(arms * ang) + 0.35 * torch.cos(two_pi * k * rho + phase)
    if name == "blobs":
        width = 0.16 + 0.12 / k  # frequency sets blob size
        bu, bv = blobs[..., 0, None, None], blobs[..., 1, None, None]  # (m, 3, 1, 1) blob centres
        d2 = (u.unsqueeze(1) - bu) ** 2 + (v.unsqueeze(1) - bv) ** 2
        return (2.0 * torch.exp(-d2 / (2 * width.unsqueeze(1) ** 2)).sum(1)).clamp(max=1.0) * 2 - 1
    # plaid: two gratings at right angles with different frequencies
    return 0.5 * torch.cos(two_pi * k * u + phase) + 0.5 * torch.cos(two_pi * 0.6 * k * v + phase2)


def _render(labels: Tensor, tpl: dict[str, Tensor], size: int, gen: torch.Generator) -> Tensor:
    """Render one chunk of samples as float (n, 3, size, size) in [0, 1]."""
    n = labels.shape[0]
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    gy, gx = coords.view(1, size, 1), coords.view(1, 1, size)

    def col(x: Tensor) -> Tensor:  # (n,) -> (n, 1, 1) for broadcasting over pixels
        return x.view(n, 1, 1)

    # --- background: smooth colour field + distractor patterns (label-independent clutter)
    base = _unif(gen, (n, 3), 0.15, 0.85)
    img = base.view(n, 3, 1, 1).repeat(1, 1, size, size)
    for _ in range(2):
        fx, fy = _unif(gen, (n,), -2.0, 2.0), _unif(gen, (n,), -2.0, 2.0)
        ph = _unif(gen, (n,), 0, 2 * math.pi)
        amp = _unif(gen, (n, 3), -0.18, 0.18)
        wave = torch.cos(math.pi * (col(fx) * gx + col(fy) * gy) + col(ph))
        img.addcmul_(amp.view(n, 3, 1, 1), wave.unsqueeze(1))
    for _ in range(2):  # distractor gabors of random orientation/frequency/colour
        cx, cy = _unif(gen, (n,), -1.0, 1.0), _unif(gen, (n,), -1.0, 1.0)
        rad = _unif(gen, (n,), 0.15, 0.35)
        ori = _unif(gen, (n,), 0.0, math.pi)
        kk = _unif(gen, (n,), 1.5, 4.0)
        ph = _unif(gen, (n,), 0, 2 * math.pi)
        colr = _unif(gen, (n, 3), 0.0, 1.0)
        present = (torch.rand((n,), generator=gen) < 0.7).float()
        dx, dy = gx - col(cx), gy - col(cy)
        env = torch.exp(-(dx**2 + dy**2) / col(2 * rad**2))
        wave = torch.cos(col(math.pi * kk) * (dx * col(torch.cos(ori)) + dy * col(torch.sin(ori))) + col(ph))
        alpha = env.mul_(wave.add_(1.0)).mul_(col(0.3 * present))  # 0.6 * env * (1 + cos) / 2
        img.lerp_(colr.view(n, 3, 1, 1), alpha.unsqueeze(1))

    # --- object: class template under translation / scale / rotation / phase nuisance
    tx, ty = _unif(gen, (n,), -_SHIFT, _SHIFT), _unif(gen, (n,), -_SHIFT, _SHIFT)
    radius = 0.62 * torch.exp(_unif(gen, (n,), -_LOG_SCALE, _LOG_SCALE))
    theta = tpl["theta"][labels] + torch.randn((n,), generator=gen) * _ROT_JITTER
    phase = _unif(gen, (n,), 0, 2 * math.pi)
    phase2 = _unif(gen, (n,), 0, 2 * math.pi)
    px, py = (gx - col(tx)) / col(radius), (gy - col(ty)) / col(radius)
    ct, st = col(torch.cos(theta)), col(torch.sin(theta))
    u, v = px * ct + py * st, -px * st + py * ct
    aspect = col(tpl["aspect"][labels])
    rho = torch.sqrt(u**2 + (v / aspect) ** 2)
    envelope = torch.sigmoid((1.0 - rho) * 10.0)

    freq = tpl["freq"][labels] * torch.exp(torch.randn((n,), generator=gen) * _FREQ_JITTER)
    fam = tpl["family"][labels]
    pattern = torch.zeros(n, size, size)
    for f in range(len(FAMILIES)):
        idx = (fam == f).nonzero().flatten()
        if idx.numel() == 0:
            continue
        pattern[idx] = _pattern(f, u[idx], v[idx], rho[idx], col(freq)[idx], col(phase)[idx],
                                col(phase2)[idx], col(tpl["arms"][labels])[idx], tpl["blobs"][labels][idx])
    mix = pattern.add_(1.0).mul_(0.5).unsqueeze(1)
    c_fg = tpl["c_fg"][labels] + torch.randn((n, 3), generator=gen) * _TINT_JITTER
    c_fg, c_bg = c_fg.clamp(0.0, 1.0).view(n, 3, 1, 1), tpl["c_bg"][labels].view(n, 3, 1, 1)
    img.lerp_(torch.lerp(c_bg, c_fg, mix), envelope.unsqueeze(1))

    # marker dot: a subtle fine-class cue (its angle around the object), in object coordinates
    ang = tpl["mark_angle"][labels] + torch.randn((n,), generator=gen) * _MARK_JITTER
    opacity = _unif(gen, (n,), 0.35, 0.8) * (torch.rand((n,), generator=gen) >= _MARK_MISSING).float()
    mu, mv = col(0.8 * torch.cos(ang)), col(0.8 * torch.sin(ang) * tpl["aspect"][labels])
    dot = torch.exp(((u - mu) ** 2 + (v - mv) ** 2).mul_(-1.0 / (2 * 0.14**2)))
    img.lerp_(tpl["c_mark"][labels].view(n, 3, 1, 1), dot.mul_(col(opacity)).unsqueeze(1))

    # --- occlusion: a random flat-coloured rectangle on some samples
    occ = torch.rand((n,), generator=gen) < 0.3
    ox, oy = _unif(gen, (n,), -1.0, 1.0), _unif(gen, (n,), -1.0, 1.0)
    ow, oh = _unif(gen, (n,), 0.15, 0.45), _unif(gen, (n,), 0.15, 0.45)
    box = ((gx - col(ox)).abs() < col(ow)) & ((gy - col(oy)).abs() < col(oh)) & col(occ)
    occ_col = _unif(gen, (n, 3), 0.0, 1.0).view(n, 3, 1, 1)
    img = torch.where(box.unsqueeze(1), occ_col, img)

    # --- photometric nuisance: per-channel gain, brightness, contrast, noise
    gain = torch.exp(torch.randn((n, 3), generator=gen) * _GAIN).view(n, 3, 1, 1)
    bright = (torch.randn((n,), generator=gen) * 0.06).view(n, 1, 1, 1)
    contrast = torch.exp(_unif(gen, (n,), -0.3, 0.2)).view(n, 1, 1, 1)
    # ((img - m) * contrast + m) * gain + bright, folded into one multiply-add
    m = img.mean(dim=(1, 2, 3), keepdim=True, dtype=torch.float64).float()  # float64: thread-count proof
    img.mul_(contrast * gain).add_(m * (1 - contrast) * gain + bright)
    img.add_(torch.randn(img.shape, generator=gen).mul_(_NOISE))
    return img.clamp_(0.0, 1.0)


def _generate_split(tpl: dict[str, Tensor], n: int, num_classes: int, size: int, seed: int,
                    split: str) -> tuple[Tensor, Tensor]:
    """Balanced labels in random order and their rendered uint8 images, chunk by chunk."""
    gen = torch.Generator().manual_seed(_derive_seed(NAME, VERSION, seed, split))
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
    images = torch.empty((n, 3, size, size), dtype=torch.uint8)
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        chunk = _render(labels[start:stop], tpl, size, gen)
        images[start:stop] = (chunk * 255.0).round_().to(torch.uint8)
    return images, labels


def _validate(split: str, num_train: int, num_test: int, num_classes: int, num_superclasses: int,
              image_size: int) -> None:
    if split not in ("train", "test"):
        raise KdforgeError(f"{NAME}: unknown split '{split}'; expected 'train' or 'test'")
    if num_superclasses < 1 or num_classes < 1 or num_classes % num_superclasses:
        raise KdforgeError(f"{NAME}: num_classes ({num_classes}) must be a positive multiple of "
                           f"num_superclasses ({num_superclasses})")
    if num_train < 1 or num_test < 1:
        raise KdforgeError(f"{NAME}: num_train and num_test must be >= 1, got {num_train} and {num_test}")
    if image_size < 8:
        raise KdforgeError(f"{NAME}: image_size must be >= 8, got {image_size}")


def generate(num_train: int = 50000, num_test: int = 10000, seed: int = 0, num_classes: int = 100,
             num_superclasses: int = 20, image_size: int = 32) -> dict[str, dict[str, Any]]:
    """Generate both splits (no cache): {"train"/"test": {images, labels, coarse, mean, std}}."""
    tpl = class_templates(seed, num_classes, num_superclasses)
    out: dict[str, dict[str, Any]] = {}
    for split, n in (("train", num_train), ("test", num_test)):
        images, labels = _generate_split(tpl, n, num_classes, image_size, seed, split)
        out[split] = {"images": images, "labels": labels, "coarse": tpl["coarse"][labels]}
    # Normalisation statistics come from the train split only (as for real data sets).
    x = out["train"]["images"].double().div_(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3))
    for split in out:
        out[split]["mean"], out[split]["std"] = mean.float(), std.float()
    return out


def class_names(num_classes: int = 100, num_superclasses: int = 20, seed: int = 0) -> list[str]:
    """Readable names like `rings07/2`: family, superclass id, index within the superclass."""
    tpl = class_templates(seed, num_classes, num_superclasses)
    per = num_classes // num_superclasses
    return [f"{FAMILIES[int(tpl['family'][c])]}{c // per:02d}/{c % per}" for c in range(num_classes)]


def procedural_cifar(split: str = "train", num_train: int = 50000, num_test: int = 10000, seed: int = 0,
                     num_classes: int = 100, num_superclasses: int = 20, image_size: int = 32,
                     root: str | os.PathLike[str] | None = None, cache: bool = True) -> ImageTensors:
    """One split of the procedural CIFAR-100-like data set, generated or loaded from the cache.

    Fine label `c` belongs to superclass `c // (num_classes // num_superclasses)`; the superclass
    ids are also in `extra["coarse"]`. `root` overrides the cache directory (else
    `$KDFORGE_CACHE`, else `~/.cache/kdforge`); `cache=False` generates in memory only.
    """
    _validate(split, num_train, num_test, num_classes, num_superclasses, image_size)
    params = {"name": NAME, "version": VERSION, "num_train": int(num_train), "num_test": int(num_test),
              "seed": int(seed), "num_classes": int(num_classes), "num_superclasses": int(num_superclasses),
              "image_size": int(image_size)}
    entry = cached_split(NAME, VERSION, params, split,
                         lambda: generate(num_train, num_test, seed, num_classes, num_superclasses, image_size),
                         ("images", "labels", "coarse", "mean", "std"), root, cache)
    return ImageTensors(
        images=entry["images"], labels=entry["labels"], num_classes=num_classes, name=NAME,
        mean=tuple(float(m) for m in entry["mean"]), std=tuple(float(s) for s in entry["std"]),
        class_names=class_names(num_classes, num_superclasses, seed), extra={"coarse": entry["coarse"]},
    )


DATASETS.register(NAME, procedural_cifar, kind="classification", source="procedural")
