"""Data sets (registered by name), batched augmentation and loading by config.

Importing this package registers every built-in data set in `kdforge.registry.DATASETS`.
"""

from __future__ import annotations

import inspect
from typing import Any

from kdforge.data import folder, formats, longtail, objects, small, synthetic  # noqa: F401  (register data sets)
from kdforge.data.base import ImageTensors
from kdforge.data.stream import STREAMING, StreamingImages
from kdforge.errors import KdforgeError
from kdforge.registry import DATASETS


def load_split(name: str, split: str, root: str | None = None, stream: bool = False,
               **args: Any) -> ImageTensors | StreamingImages:
    """Load one split ("train"/"test") of registered data set `name` as in-memory tensors.

    `root` is passed to data sets that read from disk (and as the cache directory of the
    procedural ones); `args` are the data set's own options. `stream` returns a split whose
    images are decoded per batch instead (for trees too large for memory), same options.
    """
    factory = DATASETS.get(name)
    if stream:
        if name not in STREAMING:
            raise KdforgeError(f"data set '{name}' cannot stream (data.stream=true supports: "
                               f"{', '.join(sorted(STREAMING))}); set data.stream=false")
        factory = STREAMING[name]
    params = inspect.signature(factory).parameters
    kwargs = dict(args)
    if "split" in params:
        kwargs["split"] = split
    if root is not None:
        if "root" not in params:
            raise KdforgeError(f"data set '{name}' does not read from a directory; remove data.root")
        kwargs["root"] = root
    elif "root" in params and params["root"].default is inspect.Parameter.empty:
        raise KdforgeError(f"data set '{name}' needs data.root (the directory holding its files)")
    unknown = [k for k in kwargs if k not in params
               and not any(p.kind is p.VAR_KEYWORD for p in params.values())]
    if unknown:
        valid = [p for p in params if p not in ("split", "root")]
        options = f"options: {', '.join(valid)}" if valid else "it takes no options (remove data.args)"
        raise KdforgeError(f"data set '{name}' has no option {unknown[0]!r}; {options}")
    data = factory(**kwargs)
    if not isinstance(data, ImageTensors | StreamingImages):
        raise KdforgeError(f"data set '{name}' is not an in-memory image data set")
    return data


__all__ = ["DATASETS", "ImageTensors", "StreamingImages", "load_split"]
