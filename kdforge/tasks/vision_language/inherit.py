"""Manual weight inheritance between two CLIPs (TinyCLIP): uniform layers, leading widths, first heads.

Every student tensor is cut out of its teacher counterpart: student layer j of a tower takes
teacher layer idx[j] with idx = range(0, L_s * step, step), step = L_t // L_s; every other
dimension keeps its leading entries; the attention projections keep the first H_s heads and,
inside each, the first head_dim_s channels (q, k, v rows and out_proj columns are per head).
Embeddings (patch, class, position, token), layer norms and the two projections are sliced the
same way; the student's logit scale starts at the teacher's. A student of the teacher's own sizes
is therefore an exact copy.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from kdforge.errors import KdforgeError

__all__ = ["inherit_weights", "layer_map", "slice_param"]

_LAYER = re.compile(r"^(text_model|vision_model)\.encoder\.layers\.(\d+)\.(.+)$")


def layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """The teacher layer each student layer inherits: uniform, starting at layer 0."""
    if not 1 <= student_layers <= teacher_layers:
        raise KdforgeError(f"weight inheritance: the student has {student_layers} layers, the teacher "
                           f"{teacher_layers}; it needs 1 <= student layers <= teacher layers")
    step = teacher_layers // student_layers
    return list(range(0, student_layers * step, step))


def _leading(t: Tensor, shape: torch.Size) -> Tensor:
    return t[tuple(slice(0, s) for s in shape)]


def slice_param(name: str, teacher: Tensor, shape: torch.Size, heads: tuple[int, int]) -> Tensor:
    """The teacher tensor cut to the student's `shape`; `heads` = (teacher, student) heads of its tower."""
    if teacher.dim() != len(shape) or any(s > t for s, t in zip(shape, teacher.shape)):
        raise KdforgeError(f"weight inheritance: {name} is {tuple(shape)} in the student but "
                           f"{tuple(teacher.shape)} in the teacher (a student may only be smaller)")
    h_t, h_s = heads
    if re.search(r"self_attn\.(q|k|v)_proj\.(weight|bias)$", name):
        hd_t, hd_s = teacher.shape[0] // h_t, shape[0] // h_s
        per_head = teacher.reshape(h_t, hd_t, *teacher.shape[1:])[:h_s, :hd_s]
        return _leading(per_head, torch.Size([h_s, hd_s, *shape[1:]])).reshape(shape)
    if name.endswith("self_attn.out_proj.weight"):
        hd_t, hd_s = teacher.shape[1] // h_t, shape[1] // h_s
        per_head = teacher.reshape(teacher.shape[0], h_t, hd_t)[: shape[0], :h_s, :hd_s]
        return per_head.reshape(shape)
    return _leading(teacher, shape)


def _check_compatible(t_cfg: Any, s_cfg: Any) -> None:
    tv, sv = t_cfg.vision_config, s_cfg.vision_config
    if (tv.patch_size, tv.image_size) != (sv.patch_size, sv.image_size):
        raise KdforgeError(f"weight inheritance: teacher patch/image size {tv.patch_size}/{tv.image_size} differ "
                           f"from the student's {sv.patch_size}/{sv.image_size}")
    if t_cfg.text_config.vocab_size != s_cfg.text_config.vocab_size:
        raise KdforgeError("weight inheritance: teacher and student use different vocabularies")
    for tower in ("vision_config", "text_config"):
        t, s = getattr(t_cfg, tower), getattr(s_cfg, tower)
        if s.num_attention_heads > t.num_attention_heads:
            raise KdforgeError(f"weight inheritance: the student's {tower[:-7]} tower has more heads "
                               f"({s.num_attention_heads}) than the teacher's ({t.num_attention_heads})")
        hd_s, hd_t = s.hidden_size // s.num_attention_heads, t.hidden_size // t.num_attention_heads
        if hd_s > hd_t:
            raise KdforgeError(f"weight inheritance: the student's {tower[:-7]} heads are wider ({hd_s}) than "
                               f"the teacher's ({hd_t}); keep width / heads no larger")


@torch.no_grad()
def inherit_weights(teacher: Any, student: Any) -> dict[str, list[int]]:
    """Copy the teacher's sliced weights into `student` (both `CLIPModel`s) in place; returns the layer maps."""
    t_cfg, s_cfg = teacher.config, student.config
    _check_compatible(t_cfg, s_cfg)
    maps = {"text_model": layer_map(t_cfg.text_config.num_hidden_layers, s_cfg.text_config.num_hidden_layers),
            "vision_model": layer_map(t_cfg.vision_config.num_hidden_layers,
                                      s_cfg.vision_config.num_hidden_layers)}
    heads = {"text_model": (t_cfg.text_config.num_attention_heads, s_cfg.text_config.num_attention_heads),
             "vision_model": (t_cfg.vision_config.num_attention_heads, s_cfg.vision_config.num_attention_heads)}
    source = teacher.state_dict()
    for name, param in student.state_dict().items():
        m = _LAYER.match(name)
        t_name = f"{m[1]}.encoder.layers.{maps[m[1]][int(m[2])]}.{m[3]}" if m else name
        if t_name not in source:
            raise KdforgeError(f"weight inheritance: the teacher has no tensor {t_name} for the student's {name}")
        tower = name.split(".", 1)[0]
        param.copy_(slice_param(name, source[t_name], param.shape, heads.get(tower, (1, 1))))
    return {"text": maps["text_model"], "vision": maps["vision_model"]}
