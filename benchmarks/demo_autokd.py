"""Auto-KD: the MCTS-searched distiller vs vanilla KD, same final training budget (CPU, minutes).

Data and teacher are those of `demo_dot.py` (procedural_cifar, 20 classes / 5 superclasses, 16px,
5,000 training images with 10% held out as validation, 2,000 test; resnet8 CE teacher trained
in the script on first use and cached). Student: convnet (width 8, 3 stages).

Per seed (0, 1, 2):

* search: `kdforge.search.autokd.run_autokd` with a tiny budget (`--trials`, default 10 proxy runs)
  over the default space on the logits and the feat2/feat3 layers (plus both layers at once);
  each proxy run trains the student for at most 150 steps on a 20% subset from the cached
  teacher outputs (2 fixed views), early-stopped, reward -(val CE + (1 - CKA(pool features)));
  the search seed is the run seed. Every proxy run is an ordinary run of the one Trainer
  (`kdforge.search.proxy_task.ProxyTask`, in `trials/<candidate>/` of the search directory).
  Nothing here looks at the test split;
* final training, both arms identical but for the terms (epochs, steps, data order, SGD 0.05,
  momentum 0.9, wd 5e-4, lr x0.1 at 150/180/210 of 240 epochs scaled): the searched recipe
  (`best.yaml`: CE (1 - alpha) + the distiller at its measured weight) vs vanilla KD (DOT demo
  recipe: CE 0.1 + KD 0.9, T = 4).

Metric: test top-1 of the final model (last epoch, no selection). Writes results/methods/autokd.json.

    python benchmarks/demo_autokd.py            # 3 seeds
    python benchmarks/demo_autokd.py --quick    # 1 seed, tiny search and 2 epochs (smoke test, no JSON)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from demo_dot import COMMON, DATA, STUDENT, TEACHER, milestones, stats, teacher_dir  # noqa: E402

from kdforge.config import RunConfig, load_config  # noqa: E402
from kdforge.search.autokd import run_autokd  # noqa: E402
from kdforge.search.options import AutoKDOptions  # noqa: E402
from kdforge.search.storage import complete_trials, open_study  # noqa: E402
from kdforge.train.checkpoint import atomic_write_text  # noqa: E402
from kdforge.train.trainer import Trainer  # noqa: E402

KD_TERMS = ("terms=[{loss: ce, teacher: null, group: task, weight: 0.1}, "
            "{loss: kd, weight: 0.9, args: {temperature: 4.0}}]")


# The published numbers of the hand-written proxy loop (kdforge/search/proxy.py before the proxy trials
# became Trainer runs), kept for comparison
BEFORE_TASK_MOVE = {
    "baseline_metric": {"mean": 56.567, "std": 0.679, "runs": [56.15, 56.2, 57.35]},
    "method_metric": {"mean": 55.5, "std": 2.555, "runs": [57.0, 52.55, 56.95]},
    "delta": -1.067,
    "direction_holds": False,
    "teacher_test_top1": 66.3,
    "searched": [
        {"seed": 0, "distiller": "input=logits distance=mse alpha=0.5", "proxy_reward": -2.2564},
        {"seed": 1, "distiller": "input=logits distance=pearson alpha=0.9", "proxy_reward": -2.3089},
        {"seed": 2, "distiller": "input=logits distance=kl temperature=1.0 alpha=0.9", "proxy_reward": -2.0071},
    ],
    "search_seconds": [69.8, 56.7, 31.6],
    "wall_time_s": 412.1,
    "note": ("Published before the proxy trials became Trainer runs, with another cached demo teacher (test "
             "top-1 66.3; the re-run's teacher scores 65.6, as in dot.json), which alone moves the KD baseline "
             "(no proxy involved). With the same teacher, the old hand-written proxy loop and the Trainer-based "
             "trials give bit-identical searches: all 30 trials (3 seeds x 10) have the same paths, rewards, "
             "best steps and weights."),
}


def kd_config(seed: int, epochs: int, teacher: Path) -> RunConfig:
    """The baseline recipe; the search starts from it (its terms are replaced by the searched ones)."""
    return load_config(None, [
        *DATA, *STUDENT, f"teacher.name={TEACHER['name']}", f"teacher.checkpoint={teacher}", KD_TERMS,
        "optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9", "optim.weight_decay=5e-4",
        f"schedule.milestones={milestones(epochs)}", f"trainer.epochs={epochs}", f"trainer.seed={seed}",
        *COMMON])


def search_options(seed: int, trials: int, steps: int) -> AutoKDOptions:
    return AutoKDOptions(trials=trials, seed=seed, layers={"feat2": "feat2", "feat3": "feat3"},
                         proxy_steps=steps, eval_every=max(1, steps // 3), patience=2, subset=0.2,
                         cache_epochs=2)


def trials_by_input(summary: dict) -> dict[str, dict[str, float]]:
    """How the tree spent its budget: evaluations and best proxy reward per input (first decision)."""
    out: dict[str, dict[str, float]] = {}
    for t in complete_trials(open_study(summary["study"], summary["storage"])):
        if t.user_attrs.get("cached"):
            continue
        row = out.setdefault(t.user_attrs["path"][0], {"trials": 0, "best_reward": -1e9})
        row["trials"] += 1
        row["best_reward"] = round(max(row["best_reward"], t.value), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--proxy-steps", type=int, default=150)
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, 3 trials of 30 steps, 2 epochs (no JSON)")
    parser.add_argument("--out", default=str(ROOT / "results" / "methods" / "autokd.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds, epochs, trials, steps = (([0], 2, 3, 30) if args.quick else
                                    (args.seeds, args.epochs, args.trials, args.proxy_steps))
    start = time.time()
    teacher = teacher_dir()
    teacher_acc = json.loads((teacher / "result.json").read_text())["test_top1"]
    print(f"teacher {TEACHER['name']}: test top-1 {teacher_acc:.2f}", flush=True)
    acc: dict[str, list[float]] = {"kd": [], "autokd": []}
    found, search_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            base = kd_config(seed, epochs, teacher)
            t0 = time.time()
            summary = run_autokd(base, search_options(seed, trials, steps), Path(tmp) / f"search-{seed}",
                                 quiet=False)
            search_s.append(time.time() - t0)
            found.append({"seed": seed, "distiller": summary["best_distiller"], "path": summary["best_path"],
                          "proxy_reward": round(summary["best_value"], 4), "ce_weight": summary["ce_weight"],
                          "weights": summary["weights"], "trials_by_input": trials_by_input(summary)})
            print(f"seed {seed} search ({search_s[-1]:.0f}s): {summary['best_distiller']}  "
                  f"reward {summary['best_value']:.4f}", flush=True)
            arms = {"autokd": load_config(summary["recipe"]), "kd": base}
            for arm, cfg in arms.items():
                res = Trainer(cfg, Path(tmp) / f"{arm}-{seed}", quiet=True).fit()
                acc[arm].append(res["test_top1"])
                print(f"seed {seed} {arm}: test top-1 {res['test_top1']:.2f} ({res['wall_time_s']:.0f}s)",
                      flush=True)
    wall = time.time() - start
    delta = statistics.fmean(acc["autokd"]) - statistics.fmean(acc["kd"])
    wins = sum(a > b for a, b in zip(acc["autokd"], acc["kd"]))
    print(f"autokd - kd: {delta:+.2f} points (autokd better in {wins}/{len(seeds)} seeds); wall {wall:.0f}s")
    if args.quick:
        return
    result = {
        "method": "autokd", "task": "classification",
        "data": "procedural_cifar (20 classes, 4.5k train + 0.5k val, 2k test, 16px)",
        "metric": "test top-1 (%)", "baseline": "vanilla KD (CE 0.1 + KD 0.9, T=4), same final training",
        "baseline_metric": stats(acc["kd"]), "method_metric": stats(acc["autokd"]), "delta": round(delta, 3),
        "seeds": seeds, "wall_time_s": round(wall, 1),
        "paper_claim": "the MCTS-searched distiller beats hand-designed distillers (CIFAR-100: +3-7% over "
                       "the no-KD student for CNN pairs, above KD and other hand-designed losses)",
        "direction_holds": delta > 0,
        "teacher_test_top1": teacher_acc, "searched": found,
        "search_seconds": [round(s, 1) for s in search_s],
        "before_task_move": BEFORE_TASK_MOVE,
        "settings": {"epochs": epochs, "trials": trials, "proxy_steps": steps, "subset": 0.2,
                     "student": "convnet w8 d3", "teacher": TEACHER["name"]},
        "notes": (f"Tiny search: {trials} proxy runs per seed (the paper uses tens to a hundred on a large "
                  f"space), each at most {steps} steps on a 20% subset from a 2-view teacher cache (no "
                  "teacher forward during the search; each proxy run is a Trainer run of ProxyTask with "
                  "per-step cosine lr, evaluation every proxy_steps/3 steps and patience 2), early-stopped on "
                  "the reward -(val CE + (1 - linear "
                  "CKA of the pool features)); the search seed is the run seed, so the searched distiller "
                  "can differ per seed. Weights are normalised per candidate: each distillation term gets "
                  "alpha * CE_0 / D_0 on the first batch, CE gets 1 - alpha. Found: "
                  + "; ".join(f"seed {f['seed']}: {f['distiller']} ({a:.2f} vs KD {b:.2f})"
                              for f, a, b in zip(found, acc["autokd"], acc["kd"]))
                  + f". Auto-KD better in {wins}/{len(seeds)} seeds. Evaluations per first decision (input) "
                  "and their best proxy reward are in 'searched': after one visit per input, UCT spent the "
                  "budget where the short proxy rewarded it. No random-search arm and no proxy-vs-full rank "
                  f"correlation (CPU budget). Final training {epochs} epochs, last-epoch model, identical "
                  "for both arms except the terms."),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
