"""Name -> factory registries for models, losses, methods and data sets.

Unknown names fail with one line listing the closest registered names, so a typo in a
config or on the command line is obvious without reading a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any

from kdforge.errors import KdforgeError


class Registry:
    """A mapping from short names to factories plus free-form metadata per entry."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Any] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str | None = None, obj: Any = None, **meta: Any) -> Any:
        """Register `obj` under `name`; usable as `@REG.register("x")` or `REG.register("x", f)`."""

        def add(target: Any) -> Any:
            key = name or getattr(target, "__name__", None)
            if not key:
                raise ValueError(f"cannot infer a {self.kind} name for {target!r}")
            if key in self._items and self._items[key] is not target:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
            self._items[key] = target
            self._meta[key] = dict(meta)
            return target

        return add(obj) if obj is not None else add

    def get(self, name: str) -> Any:
        if name not in self._items:
            raise KdforgeError(self.unknown_message(name))
        return self._items[name]

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(str(name), self.names(), n=5, cutoff=0.5)
        hint = f"close matches: {', '.join(close)}" if close else f"known: {', '.join(self.names())}"
        return f"unknown {self.kind} '{name}'; {hint}"

    def meta(self, name: str) -> dict[str, Any]:
        self.get(name)
        return dict(self._meta[name])

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


MODELS = Registry("model")
LOSSES = Registry("loss")
CONNECTORS = Registry("connector")
DATASETS = Registry("dataset")
METHODS = Registry("method")


def build(registry: Registry, name: str, **kwargs: Any) -> Any:
    """Look up `name` and call its factory with `kwargs`; bad kwargs become one clear line."""
    factory: Callable[..., Any] = registry.get(name)
    try:
        return factory(**kwargs)
    except TypeError as err:
        if "unexpected keyword argument" in str(err) or "missing" in str(err):
            raise KdforgeError(f"{registry.kind} '{name}': {err}") from None
        raise
