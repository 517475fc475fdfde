"""The model zoo: CIFAR / ImageNet architectures of the published KD tables plus tiny models.

`create_model(name, num_classes, in_channels, **kwargs)` builds any registered model. Every
model returns logits only from `forward(x)` and describes its intermediate features with

* `feature_taps`: logical name -> module path for `FeatureTap` (`path:input` = that module's
  input). `feat1..featK` are the stage outputs, `preact1..preactK` the same features before
  the stage's final ReLU, `pool` the pooled vector fed to the classifier (`fc:input`), and
  `stem` the stem output. For the CIFAR models `featI` is the tensor RepDistiller/mdistiller
  return as `feats[I]`, so hint-layer indices from those papers carry over unchanged.
* `stage_channels`: channels of `feat1..featK`, for building connectors.

Parameter names follow the reference implementations; `adapt_reference_state_dict` renames
the few that differ (classifiers are always `fc`) so published checkpoints load strictly.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from kdforge.models import (  # noqa: F401  (imported to register their models)
    cifar_resnet,
    imagenet,
    mobilenetv2,
    resnet_v2,
    shufflenet,
    small,
    vgg,
    wrn,
)
from kdforge.models._common import adapt_reference_state_dict
from kdforge.registry import MODELS, build


def create_model(name: str, num_classes: int = 100, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build the registered model `name`; unknown names / kwargs raise a one-line KdforgeError."""
    return build(MODELS, name, num_classes=num_classes, in_channels=in_channels, **kwargs)


def list_models(family: str | None = None) -> list[str]:
    """Registered model names, optionally only one family ("cifar", "imagenet" or "small")."""
    return [n for n in MODELS.names() if family is None or MODELS.meta(n).get("family") == family]


__all__ = ["MODELS", "adapt_reference_state_dict", "create_model", "list_models"]
