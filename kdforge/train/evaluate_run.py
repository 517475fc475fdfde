"""Evaluate a finished run's checkpoint (what `kdforge eval` prints and search arms read)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kdforge.errors import KdforgeError

__all__ = ["evaluate_run"]


def evaluate_run(run_dir: str | Path, checkpoint: str = "last", split: str = "test",
                 overrides: Sequence[str] = ()) -> dict[str, Any]:
    """top-1 / top-5 / loss of `checkpoint` (last or best) of `run_dir` on `split` (test or val);
    for a task recipe run (detection: COCO AP ...), the task's own test metrics of its last weights.

    One line when the run has no validation split for `val`, or has no `best` (best is only
    chosen on a validation split), or is an unfinished task recipe run.
    """
    from kdforge.config import load_config
    from kdforge.data.stream import fetch_images
    from kdforge.data.transforms import to_normalized
    from kdforge.train.build import build_distiller, load_data
    from kdforge.train.checkpoint import load_checkpoint
    from kdforge.train.log import json_safe
    from kdforge.train.metrics import evaluate
    from kdforge.train.stages import evaluate_recipe_run, is_task_recipe
    from kdforge.train.trainer import resolve_device

    run_dir = Path(run_dir)
    if is_task_recipe(run_dir / "config.yaml"):        # detection, NCD, SSL, ...: the task's own metrics
        if checkpoint != "last" or split != "test":
            raise KdforgeError(f"{run_dir} is a task recipe run: kdforge eval measures its last weights on the "
                               "test split (--checkpoint last --split test)")
        return {"run": str(run_dir), "checkpoint": "last", "split": "test",
                **json_safe(evaluate_recipe_run(run_dir, overrides))}
    cfg = load_config(run_dir / "config.yaml", list(overrides))
    if split == "val" and cfg.data.val_fraction <= 0:
        raise KdforgeError(f"{run_dir} has no validation split (data.val_fraction=0); use --split test")
    if checkpoint == "best" and not (run_dir / "checkpoints" / "best.json").is_file():
        raise KdforgeError(f"{run_dir} has no 'best' checkpoint: best is chosen on a validation split "
                           "(data.val_fraction > 0), never on the test split; use --checkpoint last")
    data = load_data(cfg.data, cfg.trainer.seed)
    distiller = build_distiller(cfg, data)
    device = resolve_device(cfg.trainer.device)

    def prepare(x: torch.Tensor) -> torch.Tensor:
        return to_normalized(x.to(device), data.train.mean, data.train.std)

    distiller.setup(prepare(fetch_images(data.train, torch.arange(min(2, len(data.train))))), len(data.train))
    weights, state, _ = load_checkpoint(run_dir / "checkpoints", checkpoint)
    distiller.load_checkpoint_state(weights)
    distiller.to(device)
    metrics = evaluate(distiller.eval_model(), data.test if split == "test" else data.eval, prepare,
                       cfg.data.eval_batch_size, device, workers=cfg.data.workers)
    return {"run": str(run_dir), "checkpoint": checkpoint, "epoch": state.get("epoch"), "split": split, **metrics}
