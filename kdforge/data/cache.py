"""Teacher-output cache: the teacher's logits (and tapped features) for K augmented epochs.

Why: with a frozen teacher, its forward pass is pure overhead repeated every epoch. Because each
training view is a pure function of (seed, epoch, sample index) (`kdforge.data.transforms`),
the teacher can be run once over K epochs of exactly those views, and training epoch `e` reads
the outputs of cache-epoch ``e % K`` instead of running the teacher.

API (what the trainer and the ``kdforge cache`` command use)::

    from kdforge.data.cache import TeacherCache, build_teacher_cache, cache_expectation

    path = build_teacher_cache(teacher, data.train, "runs/cache-r32x4", epochs_k=4, seed=cfg.trainer.seed,
                               crop_padding=aug.crop_padding, flip=aug.flip,
                               mean=data.train.mean, std=data.train.std, taps=["feat3"],
                               batch_size=256, device="cuda")
    cache = TeacherCache.open(path, expect=cache_expectation(teacher, data.train, seed=..., crop_padding=...,
                                                             flip=..., mean=..., std=..., taps=["feat3"]),
                              device="cuda")
    # in Trainer.make_batch, when the cache is on: take the views the cache was built from
    p = cache.view_params(epoch, index)            # == crop_flip_params(index, epoch % K, seed, ...)
    images = apply_crop_flip(train_images[index], p["dx"], p["dy"], p["flip"], aug.crop_padding)
    outs = cache.lookup(epoch, index)              # {"logits": (N, C) float32, "feat3": ...}
    batch = Batch(..., teacher_outputs={"teacher": outs})

Note the trainer must use the views of cache-epoch ``epoch % K`` (``cache.view_params`` or
``crop_flip_params(index, cache.view_epoch(epoch), ...)``), not of `epoch`, for epochs >= K.
The cache holds un-mixed views: the outputs of a mixup/cutmix image are not the mix of the
outputs, so a run with mixup/cutmix should not read the cache (or must accept the approximation).
The cache is built in float32 (no autocast); an online teacher under AMP differs by AMP rounding.

On disk (``out_dir``)::

    manifest.json               format/version, teacher_hash (sha256 of the teacher's state_dict
                                tensors), teacher_id, data_hash (sha256 of images + labels),
                                transform {seed, crop_padding, flip, mean, std}, epochs_k, taps,
                                per-sample shapes, num_samples, num_classes, shards (+ sha256)
    epoch_000.safetensors ...   one shard per cache-epoch: "logits" (N, C) fp16, "tap.<name>"
                                (N, ...) fp16, and the views "dx", "dy" (int16), "flip" (uint8)

The directory is written under a temporary name next to ``out_dir`` and renamed into place
when complete, so a crash never leaves a half-written cache. `TeacherCache.open` refuses a
stale cache (other teacher / data / transforms) or a missing / truncated / corrupt file with one
line naming what differs or the file. Memory: shards are held as fp16 tensors on the chosen
device, 2 bytes per value: N * K * (C + tap sizes) * 2 bytes (CIFAR-100 logits, K=4: 40 MB).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from kdforge.data.base import ImageTensors
from kdforge.data.transforms import apply_crop_flip, crop_flip_params, to_normalized
from kdforge.distill.frozen_teacher import FrozenTeacher
from kdforge.errors import KdforgeError
from kdforge.models.taps import FeatureTap
from kdforge.train.checkpoint import atomic_write_text

FORMAT = "kdforge-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
LOGITS = "logits"
TAP_PREFIX = "tap."
_VIEW_KEYS = ("dx", "dy", "flip")
_HASH_CHUNK = 1 << 24


# -- identity hashes ------------------------------------------------------------------------------


def _update_tensor(h: Any, name: str, t: Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    flat = t.reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1)
    data = flat.numpy()
    for start in range(0, data.size, _HASH_CHUNK):
        h.update(memoryview(data[start:start + _HASH_CHUNK]))


def teacher_state_hash(model: nn.Module) -> str:
    """sha256 of every state_dict tensor (names, dtypes, shapes, bytes): the teacher's identity."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        _update_tensor(h, name, tensor)
    return h.hexdigest()


def data_hash(data: ImageTensors) -> str:
    """sha256 of the images and labels (order included): which samples index i refers to."""
    h = hashlib.sha256()
    _update_tensor(h, "images", data.images)
    _update_tensor(h, "labels", data.labels)
    return h.hexdigest()


def transform_config(seed: int, crop_padding: int, flip: bool, mean: Sequence[float],
                     std: Sequence[float]) -> dict[str, Any]:
    """The view definition as stored in the manifest (JSON-normalised, so it compares exactly)."""
    return {"seed": int(seed), "crop_padding": int(crop_padding), "flip": bool(flip),
            "mean": [float(m) for m in mean], "std": [float(s) for s in std]}


def cache_expectation(teacher: nn.Module, data: ImageTensors, *, seed: int, crop_padding: int, flip: bool,
                      mean: Sequence[float], std: Sequence[float],
                      taps: Sequence[str] = ()) -> dict[str, Any]:
    """The `expect` dict for `TeacherCache.open` describing the run about to read the cache."""
    expect: dict[str, Any] = {"teacher_hash": teacher_state_hash(teacher), "data_hash": data_hash(data),
                              "transform": transform_config(seed, crop_padding, flip, mean, std)}
    if taps:
        expect["taps"] = list(taps)
    return expect


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# -- build --------------------------------------------------------------------------------------


def _shard_name(epoch: int) -> str:
    return f"epoch_{epoch:03d}.safetensors"


def _check_build_args(data: ImageTensors, epochs_k: int, crop_padding: int, batch_size: int,
                      mean: Sequence[float], std: Sequence[float], taps: Sequence[str]) -> None:
    if epochs_k < 1:
        raise KdforgeError(f"teacher cache: epochs_k must be >= 1, got {epochs_k}")
    if batch_size < 1:
        raise KdforgeError(f"teacher cache: batch_size must be >= 1, got {batch_size}")
    if crop_padding < 0:
        raise KdforgeError(f"teacher cache: crop_padding must be >= 0, got {crop_padding}")
    c = data.images.shape[1]
    if len(mean) != c or len(std) != c:
        raise KdforgeError(f"teacher cache: {c} image channels but mean/std of length {len(mean)}/{len(std)}")
    if len(data) == 0:
        raise KdforgeError("teacher cache: the data set is empty")
    if LOGITS in taps or len(set(taps)) != len(taps):
        raise KdforgeError(f"teacher cache: taps must be distinct feature names (logits are always "
                           f"cached), got {list(taps)}")


def _as_fp16(name: str, value: Tensor) -> Tensor:
    out = value.detach().to("cpu", torch.float16)
    if not torch.isfinite(out).all():
        raise KdforgeError(f"teacher cache: teacher output '{name}' is not finite in fp16 (values beyond "
                           "+-65504 or NaN); cannot cache it")
    return out


def _run_epoch(teacher: nn.Module, tap: FeatureTap, images: Tensor, epoch: int, seed: int, crop_padding: int,
               flip: bool, mean: Sequence[float], std: Sequence[float], taps: Sequence[str], batch_size: int,
               device: torch.device, bar: tqdm, frozen: FrozenTeacher | None = None) -> dict[str, Tensor]:
    """Teacher outputs on cache-epoch `epoch`'s views, built with exactly Trainer.make_batch's calls."""
    n = images.shape[0]
    out: dict[str, Tensor] = {}
    for start in range(0, n, batch_size):
        index = torch.arange(start, min(n, start + batch_size), device=device)
        batch = images[index]
        params = crop_flip_params(index, epoch, seed, crop_padding, flip)
        if crop_padding > 0 or flip:
            batch = apply_crop_flip(batch, params["dx"], params["dy"], params["flip"], crop_padding)
        x = to_normalized(batch.to(device), mean, std)
        tap.clear()
        with torch.no_grad():
            result = frozen(x) if frozen is not None else None
        if result is None:
            with torch.inference_mode():
                result = teacher(x), tap.features
        logits, feats = result
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            raise KdforgeError(f"teacher cache: the teacher must return (N, C) logits, got "
                               f"{getattr(logits, 'shape', type(logits).__name__)}")
        values = {LOGITS: logits, **{TAP_PREFIX + t: feats[t] for t in taps}}
        for key, value in values.items():
            if key not in out:
                out[key] = torch.empty((n, *value.shape[1:]), dtype=torch.float16)
            out[key][start:start + len(index)] = _as_fp16(key, value)
        if start == 0:
            out.update({k: torch.empty(n, dtype=torch.int16 if k != "flip" else torch.uint8)
                        for k in _VIEW_KEYS})
        for k in _VIEW_KEYS:
            out[k][start:start + len(index)] = params[k].to("cpu", out[k].dtype)
        bar.update(len(index))
    return out


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished `tmp` into `out_dir`; an existing cache is swapped out, then deleted."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rmdir(old)
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def build_teacher_cache(teacher: nn.Module, data: ImageTensors, out_dir: str | os.PathLike[str], *,
                        epochs_k: int, seed: int, crop_padding: int, flip: bool, mean: Sequence[float],
                        std: Sequence[float], taps: Sequence[str] = (), batch_size: int = 256,
                        device: str | torch.device = "cpu", teacher_id_hash: str | None = None,
                        overwrite: bool = False, progress: bool = True, freeze: bool | None = None) -> Path:
    """Run the frozen teacher over K augmented epochs of `data` and store its outputs in `out_dir`.

    The view of sample i in cache-epoch e is the trainer's view at epoch e (same seed, padding,
    flip, mean/std). `teacher_id_hash` is a free-form identity recorded as `teacher_id` (e.g. model
    name + checkpoint digest; default: the weights hash). The teacher is put in eval mode on
    `device` (its train/eval flag is restored afterwards). `freeze`: run it as a frozen graph
    (distill/frozen_teacher.py; default: on CPU), eager where it does not trace. Returns the cache directory.
    """
    taps = list(taps)
    _check_build_args(data, epochs_k, crop_padding, batch_size, mean, std, taps)
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not overwrite:
        raise KdforgeError(f"teacher cache: {out_dir} already exists (pass overwrite=True / --overwrite "
                           "to rebuild it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    teacher_hash = teacher_state_hash(teacher)
    manifest: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "teacher_hash": teacher_hash,
        "teacher_id": teacher_id_hash or teacher_hash, "data_hash": data_hash(data),
        "transform": transform_config(seed, crop_padding, flip, mean, std), "epochs_k": int(epochs_k),
        "taps": taps, "num_samples": len(data), "num_classes": int(data.num_classes), "dtype": "float16",
    }
    was_training = teacher.training
    teacher.eval().to(dev)
    images = data.images.to(dev)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    bar = tqdm(total=epochs_k * len(data), desc="teacher cache", unit="img", disable=not progress,
               dynamic_ncols=True, mininterval=0.5)
    try:
        shards = []
        with FeatureTap(teacher, taps, detach=True) as tap:
            frozen = (FrozenTeacher(teacher, tap, "teacher", log=tqdm.write)
                      if (dev.type == "cpu" if freeze is None else freeze) else None)
            for epoch in range(epochs_k):
                tensors = _run_epoch(teacher, tap, images, epoch, seed, crop_padding, flip, mean, std, taps,
                                     batch_size, dev, bar, frozen)
                file = tmp / _shard_name(epoch)
                save_file(tensors, str(file), metadata={"format": FORMAT, "epoch": str(epoch)})
                shards.append({"file": file.name, "bytes": file.stat().st_size, "sha256": _file_sha256(file)})
                if epoch == 0:
                    manifest["shapes"] = {k: list(v.shape[1:]) for k, v in tensors.items()
                                          if k not in _VIEW_KEYS}
        manifest["shards"] = shards
        manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2))
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
        teacher.train(was_training)
    return out_dir


# -- read ---------------------------------------------------------------------------------------


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not path.is_dir():
        raise KdforgeError(f"teacher cache not found: {path} (build it with `kdforge cache`)")
    if not file.is_file():
        raise KdforgeError(f"teacher cache {path} is missing {file} (incomplete or not a cache; rebuild it)")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise KdforgeError(f"teacher cache: corrupt {file} ({err}); rebuild it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise KdforgeError(f"teacher cache: {file} is not a kdforge teacher-cache manifest")
    if manifest.get("version") != VERSION:
        raise KdforgeError(f"teacher cache: {file} has format version {manifest.get('version')}, this "
                           f"kdforge reads version {VERSION}; rebuild it")
    required = ("teacher_hash", "data_hash", "transform", "epochs_k", "taps", "shapes", "shards",
                "num_samples", "num_classes")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise KdforgeError(f"teacher cache: corrupt {file} (missing {', '.join(missing)}); rebuild it")
    return manifest


_STALE_WHAT = {"teacher_hash": "another teacher (weights)", "teacher_id": "another teacher",
               "data_hash": "other data", "num_samples": "other data", "num_classes": "other data",
               "epochs_k": "another K"}


def _short(v: Any) -> str:
    return v[:12] if isinstance(v, str) and len(v) == 64 else json.dumps(v)


def check_expectation(manifest: Mapping[str, Any], expect: Mapping[str, Any], path: Path) -> None:
    """Raise one line naming what differs between a cache's manifest and the run's expectation."""
    for key, want in expect.items():
        if key == "transform":
            want_t = json.loads(json.dumps(dict(want)))
            have_t = manifest["transform"]
            diffs = [f"{k}: cache {json.dumps(have_t.get(k))} vs run {json.dumps(v)}"
                     for k, v in want_t.items() if have_t.get(k) != v]
            if diffs:
                raise KdforgeError(f"stale teacher cache {path}: built with other transforms "
                                   f"({'; '.join(diffs)}); rebuild it")
        elif key == "taps":
            lacking = [t for t in want if t not in manifest["taps"]]
            if lacking:
                raise KdforgeError(f"teacher cache {path} lacks teacher taps {', '.join(lacking)} (it has: "
                                   f"{', '.join(manifest['taps']) or 'logits only'}); rebuild it with them")
        elif key in _STALE_WHAT:
            if manifest.get(key) != want:
                raise KdforgeError(f"stale teacher cache {path}: built for {_STALE_WHAT[key]} ({key} "
                                   f"{_short(manifest.get(key))} vs expected {_short(want)}); rebuild it")
        else:
            raise KdforgeError(f"teacher cache: unknown expectation '{key}'; known: transform, taps, "
                               f"{', '.join(_STALE_WHAT)}")


class TeacherCache:
    """An opened cache: fp16 shards held in memory on `device`, read by `lookup(epoch, index)`."""

    def __init__(self, path: Path, manifest: dict[str, Any], shards: list[dict[str, Tensor]],
                 views: list[dict[str, Tensor]], taps: list[str], device: torch.device) -> None:
        self.path = path
        self.manifest = manifest
        self._shards = shards
        self._views = views
        self.taps = taps
        self.device = device

    @property
    def epochs_k(self) -> int:
        return int(self.manifest["epochs_k"])

    @property
    def num_samples(self) -> int:
        return int(self.manifest["num_samples"])

    @property
    def transform(self) -> dict[str, Any]:
        return dict(self.manifest["transform"])

    @classmethod
    def open(cls, path: str | os.PathLike[str], expect: Mapping[str, Any] | None = None,
             device: str | torch.device = "cpu", taps: Sequence[str] | None = None,
             verify: bool = True) -> TeacherCache:
        """Load and check a cache. `expect` (see `cache_expectation`) must match the manifest.

        `taps` selects which cached features to load (default: all). `verify` checks each shard's
        sha256 and that the stored views equal what `kdforge.data.transforms` computes today.
        """
        path = Path(path).expanduser()
        manifest = _read_manifest(path)
        if expect:
            check_expectation(manifest, expect, path)
        taps = list(manifest["taps"] if taps is None else taps)
        check_expectation(manifest, {"taps": taps}, path)
        dev = torch.device(device)
        shards, views = [], []
        for epoch, entry in enumerate(manifest["shards"]):
            tensors = _load_shard(path, entry, manifest, taps, verify)
            shards.append({name: tensors[key].to(dev) for name, key in
                           [(LOGITS, LOGITS), *[(t, TAP_PREFIX + t) for t in taps]]})
            views.append({k: tensors[k].to(dev, torch.bool if k == "flip" else torch.int64)
                          for k in _VIEW_KEYS})
            if verify:
                _check_views(path / entry["file"], views[-1], epoch, manifest["transform"])
        if len(shards) != manifest["epochs_k"]:
            raise KdforgeError(f"teacher cache: corrupt {path / MANIFEST} ({len(shards)} shards listed for "
                               f"epochs_k={manifest['epochs_k']}); rebuild it")
        return cls(path, manifest, shards, views, taps, dev)

    def view_epoch(self, epoch: int) -> int:
        """The cache-epoch (and augmentation epoch) that training epoch `epoch` reads."""
        return int(epoch) % self.epochs_k

    def _rows(self, index: Tensor | Sequence[int]) -> Tensor:
        idx = torch.as_tensor(index)
        if idx.dim() != 1 or idx.dtype in (torch.float16, torch.float32, torch.float64, torch.bool):
            raise KdforgeError(f"teacher cache: index must be 1-D integer sample positions, got "
                               f"{idx.dtype} {tuple(idx.shape)}")
        out_of_range = idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_samples)
        if idx.device.type == "cpu" and out_of_range:
            raise KdforgeError(f"teacher cache: sample index out of range [0, {self.num_samples}) "
                               f"(got {int(idx.min())}..{int(idx.max())})")
        return idx.to(self.device, torch.int64)

    def view_params(self, epoch: int, index: Tensor | Sequence[int]) -> dict[str, Tensor]:
        """dx, dy, flip of the cached views (on `index`'s device), for `apply_crop_flip`."""
        rows = self._rows(index)
        out_dev = index.device if isinstance(index, Tensor) else self.device
        views = self._views[self.view_epoch(epoch)]
        return {k: views[k][rows].to(out_dev) for k in _VIEW_KEYS}

    def lookup(self, epoch: int, index: Tensor | Sequence[int],
               device: str | torch.device | None = None) -> dict[str, Tensor]:
        """{"logits": (N, C) float32, tap: float32 ...} of the views of cache-epoch `epoch % K`."""
        rows = self._rows(index)
        if device is None:
            device = index.device if isinstance(index, Tensor) else self.device
        shard = self._shards[self.view_epoch(epoch)]
        return {name: t[rows].to(device, torch.float32, non_blocking=True) for name, t in shard.items()}


def _load_shard(path: Path, entry: Mapping[str, Any], manifest: Mapping[str, Any], taps: Sequence[str],
                verify: bool) -> dict[str, Tensor]:
    file = path / str(entry.get("file", ""))
    if not file.is_file():
        raise KdforgeError(f"teacher cache {path}: missing shard {file}; rebuild it")
    size = file.stat().st_size
    if size != entry.get("bytes"):
        raise KdforgeError(f"teacher cache: truncated or damaged shard {file} ({size} bytes, manifest says "
                           f"{entry.get('bytes')}); rebuild it")
    if verify and _file_sha256(file) != entry.get("sha256"):
        raise KdforgeError(f"teacher cache: corrupt shard {file} (sha256 mismatch); rebuild it")
    keys = [LOGITS, *[TAP_PREFIX + t for t in taps], *_VIEW_KEYS]
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in keys}
    except Exception as err:  # safetensors raises several types for damaged files
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise KdforgeError(f"teacher cache: cannot read shard {file} ({first}); rebuild it") from None
    n = int(manifest["num_samples"])
    for key in keys:
        want = (n,) if key in _VIEW_KEYS else (n, *manifest["shapes"][key])
        if tuple(tensors[key].shape) != tuple(want):
            raise KdforgeError(f"teacher cache: shard {file} holds '{key}' of shape "
                               f"{tuple(tensors[key].shape)}, manifest says {tuple(want)}; rebuild it")
    return tensors


def _check_views(file: Path, views: Mapping[str, Tensor], epoch: int, transform: Mapping[str, Any]) -> None:
    """Stored views must equal today's `crop_flip_params` (guards against changed augmentation code)."""
    n = views["dx"].shape[0]
    step = max(1, math.ceil(n / 4096))   # a strided sample of indices keeps open() fast
    idx = torch.arange(0, n, step, device=views["dx"].device)
    fresh = crop_flip_params(idx, epoch, transform["seed"], transform["crop_padding"], transform["flip"])
    if not all(torch.equal(views[k][idx], fresh[k].to(views[k].dtype)) for k in _VIEW_KEYS):
        raise KdforgeError(f"teacher cache: the views stored in {file} differ from what "
                           "kdforge.data.transforms computes now (augmentation code changed); rebuild it")
