"""Where generated data sets live on disk, and how to write them without half-written files.

The default directory is `$KDFORGE_CACHE`, else `~/.cache/kdforge`. Writes go to a temporary
file in the same directory followed by `os.replace`, which is atomic on POSIX and Windows, so
a crash or a concurrent reader never sees a truncated cache entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from kdforge.errors import KdforgeError

ENV_VAR = "KDFORGE_CACHE"
TMP_PREFIX = ".tmp-kdforge-"


def cache_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: `root` if given, else `$KDFORGE_CACHE`, else `~/.cache/kdforge`."""
    if root is None:
        root = os.environ.get(ENV_VAR) or Path.home() / ".cache" / "kdforge"
    return Path(root).expanduser()


def cache_key(params: dict[str, Any]) -> str:
    """A short stable hash of JSON-serialisable generation parameters (key order irrelevant)."""
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def atomic_torch_save(obj: Any, path: Path) -> None:
    """`torch.save` to `path` via a temp file + `os.replace`, so `path` is complete or absent."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise KdforgeError(f"cannot create cache directory {path.parent}: {err}") from None
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".pt", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache should be readable by others
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def try_torch_load(path: Path) -> Any | None:
    """Load a cache entry, or None if it is missing or unreadable (then the caller regenerates)."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a corrupt/foreign file is just a cache miss
        return None


def cached_split(name: str, version: int, params: dict[str, Any], split: str,
                 generate: Callable[[], dict[str, dict[str, Any]]], keys: Sequence[str],
                 root: str | os.PathLike[str] | None = None, cache: bool = True) -> dict[str, Any]:
    """One split of a generated data set: from the cache when written for exactly `params` and
    holding every key of `keys`, else generated (all splits at once, as `generate()` returns them)
    and written back. An unwritable cache only warns: it must not stop the run."""
    if not cache:
        return generate()[split]
    directory = cache_dir(root)
    stem = f"{name}-v{version}-{cache_key(params)}"
    entry = try_torch_load(directory / f"{stem}-{split}.pt")
    if isinstance(entry, dict) and entry.get("params") == params and all(k in entry for k in keys):
        return entry
    data = generate()
    try:
        for part_name, part in data.items():
            atomic_torch_save({**part, "params": params}, directory / f"{stem}-{part_name}.pt")
    except (OSError, KdforgeError) as err:
        warnings.warn(f"{name}: could not write cache in {directory}: {err}", stacklevel=3)
    return data[split]
