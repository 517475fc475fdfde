"""FeatureTap: read intermediate features of ANY nn.Module through forward hooks.

Methods never change a model's forward signature; they name the submodules whose outputs
(or inputs, with a `:input` suffix, for pre-activation features) they need. A user's own
torchvision/timm/HF model therefore works as teacher or student unchanged.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from torch import Tensor, nn

from kdforge.errors import KdforgeError

INPUT_SUFFIX = ":input"


def resolve_tap_name(model: nn.Module, name: str) -> str:
    """Map a logical tap name (`model.feature_taps`) to a module path; paths pass through."""
    aliases = getattr(model, "feature_taps", {}) or {}
    return aliases.get(name, name)


def available_taps(model: nn.Module) -> list[str]:
    """Every name FeatureTap accepts for `model`: logical aliases, then module paths."""
    aliases = list(getattr(model, "feature_taps", {}) or {})
    paths = [n for n, _ in model.named_modules() if n]
    return aliases + paths


class FeatureTap:
    """Capture named features on every forward pass of `model`.

    `names` are module paths from `model.named_modules()` or logical aliases from the
    model's `feature_taps` dict; `path:input` captures the module's input (pre-activation
    when the module is the block's final activation). After `model(x)`, `tap.features`
    maps each requested name to its tensor. Use as a context manager or call `remove()`.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], detach: bool = False) -> None:
        self.model = model
        self.names = list(dict.fromkeys(names))
        self.detach = detach
        self.features: dict[str, Tensor] = {}
        self._handles: list = []
        modules = dict(model.named_modules())
        for name in self.names:
            path = resolve_tap_name(model, name)
            module_path, capture_input = path, False
            if path.endswith(INPUT_SUFFIX):
                module_path, capture_input = path[: -len(INPUT_SUFFIX)], True
            if module_path not in modules or module_path == "":
                raise KdforgeError(self._unknown(name, module_path))
            module = modules[module_path]
            if capture_input:
                self._handles.append(module.register_forward_pre_hook(self._input_hook(name, module)))
            else:
                self._handles.append(module.register_forward_hook(self._output_hook(name)))

    def _unknown(self, name: str, module_path: str) -> str:
        options = available_taps(self.model)
        close = difflib.get_close_matches(module_path, options, n=5, cutoff=0.4)
        shown = close or options[:20]
        more = "" if close or len(options) <= 20 else f" (and {len(options) - 20} more)"
        return (f"unknown tap '{name}' on {type(self.model).__name__}; "
                f"{'close matches' if close else 'available'}: {', '.join(shown)}{more}")

    def _store(self, name: str, value: object) -> None:
        if isinstance(value, tuple | list):
            value = value[0]
        if not isinstance(value, Tensor):
            raise KdforgeError(f"tap '{name}' produced {type(value).__name__}, not a tensor")
        self.features[name] = value.detach() if self.detach else value

    def _output_hook(self, name: str):
        def hook(_module: nn.Module, _inputs: tuple, output: object) -> None:
            self._store(name, output)
        return hook

    def _input_hook(self, name: str, module: nn.Module):
        inplace = bool(getattr(module, "inplace", False))

        def hook(_module: nn.Module, inputs: tuple) -> None:
            value = inputs[0]
            # An in-place activation would overwrite the captured tensor: keep a copy.
            self._store(name, value.clone() if inplace and isinstance(value, Tensor) else value)
        return hook

    def clear(self) -> None:
        self.features = {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
