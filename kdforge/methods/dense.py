"""`method: dense` recipes: a single- or multi-task dense predictor trained alone (no teacher, no KD).

The baselines of dense-prediction distillation: the student of `configs/methods/mtl_cskd.yaml`
trained from the labels only, on one task (the multi-task score's single-task references) or on
all of them (`configs/dense/*.yaml`); `teacher_only: true` trains the recipe's teacher, the run a
distillation recipe reuses through `teacher.run`. Schema: `MTLCSKDRecipe` without `mtl_cskd:`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdforge.errors import ConfigError
from kdforge.methods.mtl_cskd import MTLCSKDRecipe, run_mtl_cskd
from kdforge.registry import METHODS
from kdforge.train.stages import parse_recipe

__all__ = ["DenseRecipe"]


class DenseRecipe:
    """Registered entry for `method: dense` recipes."""

    @classmethod
    def run_config(cls, tree: dict[str, Any], source: str, run_dir: Path) -> dict[str, Any]:
        if "mtl_cskd" in tree:
            raise ConfigError(f"{source}: a dense recipe trains without distillation; mtl_cskd: belongs in a "
                              "method: mtl_cskd recipe")
        cfg, trainer, text = parse_recipe(tree, source, MTLCSKDRecipe, method="dense")
        cfg.mtl_cskd.beta = 0.0
        cfg.check(source)
        return run_mtl_cskd(cfg, run_dir, trainer, text)


METHODS.register("dense", DenseRecipe, family="dense-prediction",
                 paper="single- / multi-task dense predictor without distillation (UNet or FPN decoder)",
                 summary="semantic segmentation, depth, normals and boundaries from procedural scenes or PNG "
                         "folders; mIoU, RMSE / abs-rel, angle error, boundary F, multi-task score", task="dense")
