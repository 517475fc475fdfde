"""`method: bev_detector` recipes: the pillar BEV detector trained alone, the baseline of 3D detection KD.

The point-cloud package's detector (pillar encoder, BEV CNN, CenterPoint heatmap + box heads) on
procedural scenes or a user's KITTI-style folder, without a teacher. `teacher_only: true` trains
the recipe's `teacher` architecture instead (configs/pointcloud/teacher.yaml), the run a
distillation recipe reuses through `teacher.run`. Schema: `kdforge.tasks.pointcloud.task.BEVRecipe`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdforge.registry import METHODS
from kdforge.tasks.pointcloud.task import BEVDetectorModule, BEVRecipe, run_bev
from kdforge.train.stages import parse_recipe

__all__ = ["BEVDetectorRecipe"]


class BEVDetectorRecipe:
    """Registered entry for `method: bev_detector` recipes."""

    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str, run_dir: Path) -> dict[str, Any]:
        cfg, trainer, text = parse_recipe(tree, source, BEVRecipe, method="bev_detector")
        cfg.check(source)
        return run_bev(cfg, BEVRecipe, run_dir, trainer, text, lambda student, _: BEVDetectorModule(student),
                       needs_teacher=False, method="bev_detector")


METHODS.register("bev_detector", BEVDetectorRecipe, family="3d-detection",
                 paper="pillar BEV detector without distillation (PointPillars-style encoder, CenterPoint heads)",
                 summary="train a BEV detector on procedural point-cloud scenes or KITTI-style data; BEV / 3D AP",
                 task="pointcloud")
