"""CLIP towers: `transformers.CLIPModel` from a small recipe config, or a user's local checkpoint.

`build_clip` makes a randomly initialised CLIP whose sizes come from a recipe's `model` block;
`load_clip(local_dir)` loads a user's saved CLIP / TinyCLIP (`save_pretrained` layout) without
any download: a directory that is missing or holds no CLIP fails in one line. Embeddings are
read the same way for both (pooled tower output -> projection), so methods never care which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from kdforge.errors import ConfigError, KdforgeError
from kdforge.tasks.vision_language import require_transformers

__all__ = ["MEAN", "STD", "ClipModelConfig", "TowerSpec", "build_clip", "count_parameters", "encode_images",
           "encode_texts", "load_clip", "load_local_pretrained", "logit_scale", "pixels"]

MEAN, STD = 0.5, 0.25      # pixel normalisation of the procedural images


@dataclass
class TowerSpec:
    layers: int = 2
    width: int = 64
    heads: int = 2
    mlp: int = 128


@dataclass
class ClipModelConfig:
    """A CLIP's sizes (random init), or `local_dir`: a saved CLIP (and its tokenizer) to load instead."""

    vision: TowerSpec = field(default_factory=TowerSpec)
    text: TowerSpec = field(default_factory=TowerSpec)
    patch_size: int = 8
    projection_dim: int = 64
    context_length: int = 16
    local_dir: str | None = None

    def check(self, where: str) -> None:
        for name, t in (("vision", self.vision), ("text", self.text)):
            if min(t.layers, t.width, t.heads, t.mlp) < 1 or t.width % t.heads:
                raise ConfigError(f"{where}.{name}: layers, width, heads, mlp must be >= 1 and width divisible "
                                  f"by heads, got {t.layers}, {t.width}, {t.heads}, {t.mlp}")
        if self.patch_size < 1 or self.projection_dim < 1 or self.context_length < 4:
            raise ConfigError(f"{where}: patch_size and projection_dim must be >= 1 and context_length >= 4")


def build_clip(cfg: ClipModelConfig, vocab_size: int, image_size: int,
               special: tuple[int, int, int] = (0, 2, 3)) -> nn.Module:
    """A randomly initialised `CLIPModel` of the recipe's sizes; `special`: the (pad, bos, eos) token ids."""
    transformers = require_transformers()
    if image_size % cfg.patch_size:
        raise ConfigError(f"model.patch_size {cfg.patch_size} does not divide the image size {image_size}")
    text = dict(vocab_size=vocab_size, hidden_size=cfg.text.width, intermediate_size=cfg.text.mlp,
                num_hidden_layers=cfg.text.layers, num_attention_heads=cfg.text.heads,
                max_position_embeddings=cfg.context_length, pad_token_id=special[0], bos_token_id=special[1],
                eos_token_id=special[2])
    vision = dict(image_size=image_size, patch_size=cfg.patch_size, hidden_size=cfg.vision.width,
                  intermediate_size=cfg.vision.mlp, num_hidden_layers=cfg.vision.layers,
                  num_attention_heads=cfg.vision.heads)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim)
    return transformers.CLIPModel(config)


def load_local_pretrained(local_dir: str | Path, class_name: str, model_type: str, what: str) -> nn.Module:
    """`transformers.<class_name>.from_pretrained(local_dir)` for a user's saved model, never a hub name.

    One line when the directory holds no config.json, another model type (`model_type` expected) or
    weights transformers cannot load; nothing is downloaded."""
    transformers = require_transformers()
    path = Path(local_dir)
    if not (path / "config.json").is_file():
        raise KdforgeError(f"model.local_dir {path} is not a saved model directory (no config.json); "
                           "nothing is downloaded: pass a local directory written by save_pretrained")
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:        # noqa: BLE001 (transformers raises many kinds)
        raise KdforgeError(f"cannot read {path / 'config.json'}: {str(exc).splitlines()[0]}") from None
    if getattr(config, "model_type", None) != model_type:
        raise KdforgeError(f"model.local_dir {path} holds a {getattr(config, 'model_type', '?')!r} model, "
                           f"not {what}")
    transformers.utils.logging.disable_progress_bar()       # one bar per load clutters run logs
    try:
        return getattr(transformers, class_name).from_pretrained(str(path), local_files_only=True)
    except Exception as exc:        # noqa: BLE001
        raise KdforgeError(f"cannot load the {class_name} in {path}: {str(exc).splitlines()[0]}") from None


def load_clip(local_dir: str | Path) -> nn.Module:
    """A user's saved CLIP from a local directory (never a hub name: nothing downloads)."""
    return load_local_pretrained(local_dir, "CLIPModel", "clip", "a CLIP checkpoint")


def pixels(images_uint8: Tensor) -> Tensor:
    """uint8 images -> the towers' normalised float input."""
    return (images_uint8.float() / 255 - MEAN) / STD


def encode_images(model: Any, pixel_values: Tensor) -> Tensor:
    """Projected (un-normalised) image embeddings (N, projection_dim)."""
    return model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)


def encode_texts(model: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Projected (un-normalised) text embeddings (N, projection_dim), pooled at the <eos> token."""
    return model.text_projection(model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output)


def count_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def logit_scale(model: Any) -> Tensor:
    """exp(logit_scale) clamped at 100, as CLIP does."""
    return model.logit_scale.exp().clamp(max=100.0)

