"""`method: video` recipes: a clip classifier trained on the labels alone, the baseline of video KD.

The video package's models on its procedural multi-modal clips without a teacher: the RGB-only
student of `configs/methods/mm_ego_kd.yaml` from cross-entropy (`configs/video/rgb_student.yaml`,
the paper's headline baseline), or with `teacher_only: <modality | fusion>` one of the teachers
(`configs/video/fusion_teacher.yaml`), the runs a distillation recipe reuses through
`teacher_runs.<m>`. Schema: `MMEgoKDRecipe`; its `distill:` section must not distil (a_kd 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdforge.errors import ConfigError
from kdforge.methods.mm_ego_kd import MMEgoKDRecipe, run_mm_ego_kd
from kdforge.registry import METHODS
from kdforge.train.stages import parse_recipe

__all__ = ["VideoRecipe"]


class VideoRecipe:
    """Registered entry for `method: video` recipes."""

    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str, run_dir: Path) -> dict[str, Any]:
        cfg, trainer, text = parse_recipe(tree, source, MMEgoKDRecipe, method="video")
        if cfg.distill.a_kd > 0:
            raise ConfigError(f"{source}: a video recipe trains from the labels alone; distill.a_kd > 0 belongs in "
                              "a method: mm_ego_kd recipe")
        cfg.check(source)
        return run_mm_ego_kd(cfg, run_dir, trainer, text)


METHODS.register("video", VideoRecipe, family="video",
                 paper="clip classifier without distillation (per-modality 3D-conv trunks, late fusion)",
                 summary="an RGB / flow / audio or fused action classifier on procedural multi-modal clips; "
                         "top-1, ECE, FLOPs", task="video")
