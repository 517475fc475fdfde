"""A user's multimodal action clips as folders of frames, flow frames and WAV audio (EPIC-Kitchens style).

Layout (one folder per clip; the split files list the clips and their verb / noun classes)::

    root/train.csv, root/val.csv, root/test.csv    header `clip,verb,noun` (EPIC's verb_class / noun_class)
    root/<clip>/rgb/*.jpg|*.png                    RGB frames, in file-name order
    root/<clip>/flow/u/*.jpg|*.png, flow/v/...     8-bit optical flow (TV-L1 as EPIC / TSN store it):
                                                   displacement = (value / 255 * 2 - 1) * flow_bound px
    root/<clip>/audio.wav                          PCM WAV (8 / 16 / 32-bit), channels averaged

Only the modalities asked for are read. Each clip becomes what the procedural clips are, so the
same models and methods run on it: `frames` frames at the centres of equal segments (TSN
sampling; a short clip repeats frames), resized to `size` x `size` (RGB normalised as the
procedural clips are; flow resized and its displacements rescaled to the new pixel size), and a
log-magnitude STFT averaged down to `audio_bins` x `audio_steps` and standardised per clip. The
action class is `verb * nouns + noun`. Errors name the file and the problem in one line: a missing
split file or clip folder, a bad header or class id, no frames, u / v frames that differ in number
or size, an unreadable image or WAV.
"""

from __future__ import annotations

import csv
import wave
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.errors import KdforgeError
from kdforge.tasks.video.data import MODALITIES, ClipData

__all__ = ["load_clip_folder", "read_wav"]

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _frames(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise KdforgeError(f"clip data: missing folder {folder}")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise KdforgeError(f"clip data: no .jpg / .png frames in {folder}")
    return paths


def _segment_centres(count: int, frames: int) -> list[int]:
    """TSN sampling: the frame at the centre of each of `frames` equal segments of a `count`-frame clip."""
    return [min(count - 1, int((i + 0.5) * count / frames)) for i in range(frames)]


def _image(path: Path, mode: str) -> Tensor:
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert(mode), dtype=np.float32) / 255.0
    except Exception as exc:  # Pillow raises several types for unreadable files
        raise KdforgeError(f"clip data: cannot read {path}: {exc}") from None
    t = torch.from_numpy(arr.copy())
    return t.permute(2, 0, 1) if t.dim() == 3 else t[None]


def _resize(x: Tensor, size: int) -> Tensor:
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def _rgb(clip: Path, frames: int, size: int) -> Tensor:
    paths = _frames(clip / "rgb")
    picked = [_resize(_image(paths[i], "RGB"), size) for i in _segment_centres(len(paths), frames)]
    return (torch.stack(picked, 1) - 0.5) / 0.3                                      # (3, T, S, S)


def _flow(clip: Path, frames: int, size: int, bound: float) -> Tensor:
    u_paths, v_paths = _frames(clip / "flow" / "u"), _frames(clip / "flow" / "v")
    if len(u_paths) != len(v_paths):
        raise KdforgeError(f"clip data: {clip / 'flow'} has {len(u_paths)} u and {len(v_paths)} v frames")
    out = []
    for i in _segment_centres(len(u_paths), frames):
        u, v = _image(u_paths[i], "L"), _image(v_paths[i], "L")
        if u.shape != v.shape:
            raise KdforgeError(f"clip data: {u_paths[i]} and {v_paths[i]} differ in size")
        h, w = u.shape[1:]
        disp = (torch.cat([u, v]) * 2 - 1) * bound                                     # pixels of the stored frame
        disp = _resize(disp, size) * torch.tensor([size / w, size / h]).view(2, 1, 1)   # pixels of the resized frame
        out.append(disp)
    return torch.stack(out, 1)                                                        # (2, T, S, S)


def read_wav(path: Path) -> tuple[Tensor, int]:
    """(mono samples in [-1, 1], sample rate) of a PCM WAV file (channels averaged)."""
    import numpy as np

    try:
        with wave.open(str(path), "rb") as f:
            width, channels, rate = f.getsampwidth(), f.getnchannels(), f.getframerate()
            raw = f.readframes(f.getnframes())
    except (wave.Error, EOFError, OSError) as exc:
        raise KdforgeError(f"clip data: cannot read {path} as PCM WAV: {exc}") from None
    if width == 1:
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width in (2, 4):
        ints = np.frombuffer(raw, dtype=np.int16 if width == 2 else np.int32)
        x = ints.astype(np.float32) / float(2 ** (8 * width - 1))
    else:
        raise KdforgeError(f"clip data: {path}: {8 * width}-bit WAV samples are not supported (8, 16 or 32-bit PCM)")
    if x.size < channels * 2:
        raise KdforgeError(f"clip data: {path} holds no audio")
    return torch.from_numpy(x.reshape(-1, channels).mean(1).copy()), rate


def _audio(clip: Path, bins: int, steps: int) -> Tensor:
    samples, _ = read_wav(clip / "audio.wav")
    n_fft = 512
    while n_fft > 16 and n_fft > len(samples):
        n_fft //= 2
    spec = torch.stft(samples, n_fft, hop_length=max(1, n_fft // 4), window=torch.hann_window(n_fft),
                      return_complex=True).abs()
    spec = torch.log1p(spec)[None, None]                                             # (1, 1, F, frames)
    spec = F.interpolate(spec, size=(bins, steps), mode="area") if spec.shape[-1] >= steps else \
        F.interpolate(spec, size=(bins, steps), mode="bilinear", align_corners=False)
    spec = spec[0]
    return (spec - spec.mean()) / spec.std().clamp_min(1e-6)                         # (1, F, A)


def _rows(root: Path, split: str, verbs: int, nouns: int) -> list[tuple[str, int, int]]:
    path = root / f"{split}.csv"
    if not path.is_file():
        raise KdforgeError(f"clip data: missing split file {path}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"clip", "verb", "noun"} <= set(reader.fieldnames):
            raise KdforgeError(f"clip data: {path} needs the header clip,verb,noun, got {reader.fieldnames}")
        rows = []
        for line, row in enumerate(reader, start=2):
            try:
                verb, noun = int(row["verb"]), int(row["noun"])
            except (TypeError, ValueError):
                raise KdforgeError(f"clip data: {path}:{line}: verb and noun must be integers, got "
                                   f"{row['verb']!r}, {row['noun']!r}") from None
            if not (0 <= verb < verbs and 0 <= noun < nouns):
                raise KdforgeError(f"clip data: {path}:{line}: verb {verb} / noun {noun} outside 0..{verbs - 1} / "
                                   f"0..{nouns - 1} (data.verbs / data.nouns)")
            rows.append((row["clip"], verb, noun))
    if not rows:
        raise KdforgeError(f"clip data: {path} lists no clips")
    return rows


def load_clip_folder(root: str | Path, split: str, verbs: int, nouns: int, frames: int = 8, size: int = 16,
                     audio_bins: int = 12, audio_steps: int = 16, flow_bound: float = 20.0,
                     modalities: Sequence[str] = MODALITIES) -> ClipData:
    """The clips that `root/<split>.csv` lists, as a `ClipData` with the procedural clips' shapes."""
    root = Path(root)
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown or not modalities:
        raise KdforgeError(f"clip data: modalities must be some of {', '.join(MODALITIES)}, got {list(modalities)}")
    rows = _rows(root, split, verbs, nouns)
    out: dict[str, list[Tensor]] = {m: [] for m in modalities}
    for name, _, _ in rows:
        clip = root / name
        if not clip.is_dir():
            raise KdforgeError(f"clip data: {root / split}.csv lists {name!r} but {clip} is not a folder")
        if "rgb" in out:
            out["rgb"].append(_rgb(clip, frames, size))
        if "flow" in out:
            out["flow"].append(_flow(clip, frames, size, flow_bound))
        if "audio" in out:
            out["audio"].append(_audio(clip, audio_bins, audio_steps))
    action = torch.tensor([v * nouns + n for _, v, n in rows], dtype=torch.long)
    names = [f"v{v}-n{o}" for v in range(verbs) for o in range(nouns)]
    return ClipData({m: torch.stack(x) for m, x in out.items()}, action, action.clone(), verbs * nouns, verbs, nouns,
                    names)
