"""Demo: adasim against its paper's baseline, 3 seeds, same budget -> results/methods/adasim.json.

Recipe: configs/methods/adasim.yaml; the baseline is the same recipe with the override below.
Every arm is `kdforge train RECIPE --out runs/demo_adasim/<mode>_s<seed>` (the one Trainer; run
directories under the git-ignored runs/, replaced on each demo run).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import torch
from _results import publish  # benchmarks/ is on sys.path

from kdforge.config import load_yaml
from kdforge.tasks.common import mean_std
from kdforge.train.stages import run_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "methods" / "adasim.yaml"
SEEDS = [0, 1, 2]
RUNS = ROOT / "runs" / "demo_adasim"
# The headline numbers of this demo before the move onto the one Trainer (own loop, a view generator
# advancing across steps; results/methods/adasim.json at commit 7762ab1).
BEFORE_TASK_MOVE = {
    "baseline_metric": {"mean": 28.222, "std": 4.504, "runs": [28.0, 23.833, 32.833]},
    "method_metric": {"mean": 28.611, "std": 4.448, "runs": [28.0, 24.5, 33.333]},
    "delta": 0.389,
    "direction_holds": True,
    "linear_probe_top1": {"dino": {"mean": 59.667, "std": 3.468, "runs": [61.5, 55.667, 61.833]},
                          "adasim": {"mean": 59.833, "std": 3.48, "runs": [61.5, 55.833, 62.167]}},
    "neighbour_precision": {"mean": 0.2, "std": 0.081, "runs": [0.136, 0.292, 0.172]},
    "wall_time_s": 279.9,
}


def main() -> int:
    torch.set_num_threads(1)
    start = time.time()
    runs: dict[str, list[dict]] = {"dino": [], "adasim": []}
    shutil.rmtree(RUNS, ignore_errors=True)
    for seed in SEEDS:
        for mode in runs:
            overrides = [f"seed={seed}", f"adasim.mode={mode}", "trainer.progress=false"]
            r = run_recipe(RECIPE, overrides, out=RUNS / f"{mode}_s{seed}")
            runs[mode].append(r)
            print(mode, seed, r, flush=True)
    base = mean_std([r["knn_top1"] for r in runs["dino"]])
    meth = mean_std([r["knn_top1"] for r in runs["adasim"]])
    delta = round(meth["mean"] - base["mean"], 3)
    paired = [round(m["knn_top1"] - b["knn_top1"], 3) for m, b in zip(runs["adasim"], runs["dino"], strict=True)]
    entropy = mean_std([r["final_teacher_entropy"] for r in runs["dino"] + runs["adasim"]])["mean"]
    tree = load_yaml(RECIPE)
    out = {
        "method": "adasim", "task": "self-supervised self-distillation (kdforge.tasks.selfsup)",
        "data": f"procedural_cifar 10 classes 16px, {tree['data']['num_train']} unlabelled train, "
        f"{tree['data']['num_test']} test (labels only for evaluation)",
        "metric": "k-NN top-1 (%) on the test split, k=20, T=0.07 (teacher backbone)",
        "baseline": "DINO-style self-distillation (same loop, never bootstrap)",
        "baseline_metric": base, "method_metric": meth, "delta": delta, "seeds": SEEDS,
        "wall_time_s": round(time.time() - start, 1),
        "paper_claim": "AdaSim improves over DINO (no bootstrapping) and over naive NN bootstrapping",
        "direction_holds": bool(delta > 0),
        "linear_probe_top1": {m: mean_std([r["linear_top1"] for r in runs[m]]) for m in runs},
        "neighbour_precision": mean_std([r["neighbour_precision"] for r in runs["adasim"]]),
        "bootstrap_rate_per_epoch": [r["bootstrap_rate_per_epoch"] for r in runs["adasim"]],
        "notes": (
            f"{tree['loop']['epochs']} epochs, window V={tree['adasim']['window']}, k=10, tau_s=0.001 (card), "
            "TinyCNN backbone, DINO head K=256, two global views. With tau_s=0.001 the neighbour sampling is "
            "almost deterministic and at this short budget only a small fraction of images are bootstrapped "
            "(bootstrap_rate_per_epoch), so the two arms differ little; the difference is within seed noise "
            "unless the delta exceeds the stds. "
            f"The DINO teacher output stays close to uniform (final teacher entropy ~{entropy:.2f} nats vs "
            f"log 256 = 5.55) at {tree['loop']['epochs']} epochs, i.e. training is still in the early, "
            f"near-collapsed phase for both arms. Paired per-seed k-NN differences {paired}. "
            "before_task_move: the same demo before the move onto the one Trainer (batch orders, views and "
            "partner draws are now drawn per (seed, epoch, step), so per-seed numbers differ)."
        ),
        "paired_knn_delta": paired,
        "before_task_move": BEFORE_TASK_MOVE,
    }
    publish(out, ROOT / "results" / "methods" / "adasim.json", full=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
