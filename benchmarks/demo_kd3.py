"""Demo: kd3 against its paper's baseline, 3 seeds, same budget -> results/methods/kd3.json.

Recipe: configs/methods/kd3.yaml; the baseline is the same recipe with the override below. Every
stage trains through the one Trainer into a temporary run directory; one teacher stage is shared
by all arms and seeds.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from _results import publish  # benchmarks/ is on sys.path

from kdforge.config import load_yaml
from kdforge.tasks.common import mean_std

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "methods" / "kd3.yaml"
SEEDS = [0, 1, 2]


HEADLINE = ("test_top1", "teacher_test_top1", "web_in_class_top1", "style_gap", "selected_fraction",
            "selection_precision")


def main() -> int:
    torch.set_num_threads(1)
    from kdforge.config import TrainerConfig
    from kdforge.methods.kd3 import KD3Config, run_kd3, train_teacher
    from kdforge.tasks.common import load_task_config

    start = time.time()
    base_cfg = load_task_config(KD3Config, load_yaml(RECIPE), name=str(RECIPE))
    d = base_cfg.data
    data = d.build()
    trainer = TrainerConfig(device="cpu", tensorboard=False, progress=False)
    work = Path(tempfile.mkdtemp(prefix="demo_kd3-"))   # every stage is an ordinary run directory here
    try:    # one teacher stage, shared by every arm and seed (the recipe's teacher_seed does not vary)
        teacher = train_teacher(base_cfg, work / "shared", data, trainer).module.eval_model()
        runs: dict[str, list[dict]] = {"kd": [], "kd3": []}
        for seed in SEEDS:
            for arm in runs:
                cfg = load_task_config(KD3Config, load_yaml(RECIPE), [f"seed={seed}", f"kd3.arm={arm}"], str(RECIPE))
                r = run_kd3(cfg, work / f"{arm}-seed{seed}", teacher, data, trainer)
                r = {k: r[k] for k in HEADLINE if k in r}
                runs[arm].append(r)
                print(arm, seed, {k: round(v, 3) for k, v in r.items()}, f"({time.time() - start:.0f}s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = mean_std([r["test_top1"] for r in runs["kd"]])
    meth = mean_std([r["test_top1"] for r in runs["kd3"]])
    delta = round(meth["mean"] - base["mean"], 3)
    out = {
        "method": "kd3", "task": "data-free KD from a web pool (kdforge.tasks.datafree)",
        "data": f"procedural_cifar 10 classes 16px: teacher on {d.num_orig} originals; web pool {d.num_web} "
        f"(50% re-styled in-class, 20% tile-shuffled, 30% foreign/noise); original test {d.num_test}",
        "metric": "student top-1 (%) on the original test split",
        "baseline": "plain KD (T=4) on the whole web pool, same student/budget",
        "baseline_metric": base, "method_metric": meth, "delta": delta, "seeds": SEEDS,
        "wall_time_s": round(time.time() - start, 1),
        "paper_claim": "KD3 beats data-free / web-data KD baselines (CIFAR-10 95.21%)",
        "direction_holds": bool(delta > 0),
        "teacher_test_top1": runs["kd"][0]["teacher_test_top1"],
        "selection_precision": mean_std([r.get("selection_precision") for r in runs["kd3"]]),
        "selected_fraction": mean_std([r.get("selected_fraction") for r in runs["kd3"]]),
        "style_gap": {a: mean_std([r["style_gap"] for r in runs[a]]) for a in runs},
        "notes": NOTES,
        "before_task_move": BEFORE_TASK_MOVE,
    }
    publish(out, ROOT / "results" / "methods" / "kd3.json", full=True)
    return 0


# The published numbers of the old per-setting loop (tasks/common.fit, stateful batch order), kept for comparison
BEFORE_TASK_MOVE = {
    "baseline_metric": {"mean": 67.25, "std": 5.22, "runs": [69.75, 70.75, 61.25]},
    "method_metric": {"mean": 43.0, "std": 6.171, "runs": [50.125, 39.375, 39.5]},
    "delta": -24.25,
    "direction_holds": False,
    "teacher_test_top1": 92.875,
    "selected_fraction": {"mean": 0.3, "std": 0.02, "runs": [0.322, 0.285, 0.292]},
    "selection_precision": {"mean": 0.609, "std": 0.017, "runs": [0.622, 0.59, 0.615]},
}

NOTES = (
    "Card defaults (threshold 0.7, lambda 1->0.5, agreement after 2 epochs, alpha 1, beta 0.1, T 4). "
    "At this scale the teacher (TinyCNN, ~80% on originals, ~70% on re-styled in-class web images) is "
    "about as confident on the foreign/noise images as on in-class ones, so confidence selection keeps "
    "a small subset with low precision (see selection_precision) and the student learns from far fewer "
    "samples than plain KD, whose soft targets on *all* images (even off-topic ones) carry dark knowledge. "
    "Exploratory single runs on seed 0 (not used for selection): threshold 0.4 -> ~24%, threshold 0 "
    "(agreement only) -> ~18%, no feat/contrastive terms -> ~16%, own classifier instead of sharing -> ~16%; "
    "plain KD ~39%. A better-calibrated teacher (or an OOD score) would be needed for the selection to help."
)

if __name__ == "__main__":
    sys.exit(main())
