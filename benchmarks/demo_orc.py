"""ORC vs KD from the pivot teacher alone, same student architecture and schedule (CPU, minutes).

Data and teacher are those of `demo_dot.py` (procedural_cifar, 20 classes / 5 superclasses, 16px,
5,000 training images with 10% held out as validation, 2,000 test; resnet8 CE teacher, cached
and shared). Students: convnet width 8, 3 stages.

* baseline `kd`: one student, vanilla KD from the pivot (T=4, CE 0.1 / KD 0.9).
* `orc`: three students of that architecture (fresh initialisations) and the frozen pivot;
  each iteration the student with the lowest batch CE is promoted, refined on the others' error
  samples (CE + KD from the pivot, 0.1 / 0.9) and joins the teacher group, whose mean logits
  teach the other two (CE 0.1 / KD 0.9, T=4).

Same epochs, steps, data order, augmentation, optimiser (SGD 0.05, momentum 0.9, wd 5e-4) and
lr schedule; ORC spends 3x the student compute (three networks). Reported network: the student
ORC promoted most often recently (training-batch ranking, not the test split), final epoch.
Also recorded: each ORC student's test top-1 and the "false knowledge rate" (share of training
samples whose teaching target's argmax is wrong) over the last epoch. Writes
results/methods/orc.json.

    python benchmarks/demo_orc.py            # 3 seeds
    python benchmarks/demo_orc.py --quick    # 1 seed, few epochs (smoke test, no JSON)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from demo_dot import COMMON, DATA, STUDENT, TEACHER, milestones, stats, teacher_dir  # noqa: E402

import kdforge.methods.orc  # noqa: E402,F401  (registers the method)
from kdforge.config import RunConfig, load_config  # noqa: E402
from kdforge.distill.distiller import Step  # noqa: E402
from kdforge.train.checkpoint import atomic_write_text  # noqa: E402
from kdforge.train.metrics import evaluate  # noqa: E402
from kdforge.train.trainer import Trainer  # noqa: E402

ARMS = ("kd", "orc")


def run_config(arm: str, seed: int, epochs: int, teacher: Path) -> RunConfig:
    """Both arms share everything but the method (and ORC's own, equal, loss weights)."""
    method = (["method.name=orc", "method.args={num_students: 3, num_promoted: 1, temperature: 4.0, "
               "ce_weight: 0.1, kd_weight: 0.9, refine_ce_weight: 0.1, refine_kd_weight: 0.9}"]
              if arm == "orc" else
              ["terms=[{loss: ce, teacher: null, group: task, weight: 0.1}, "
               "{loss: kd, weight: 0.9, args: {temperature: 4.0}}]"])
    return load_config(None, [
        *DATA, *STUDENT, f"teacher.name={TEACHER['name']}", f"teacher.checkpoint={teacher}", *method,
        "optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9", "optim.weight_decay=5e-4",
        f"schedule.milestones={milestones(epochs)}", f"trainer.epochs={epochs}", f"trainer.seed={seed}",
        *COMMON])


class FalseKnowledge:
    """Forward hook: share of samples whose teaching target is wrong, over the last epoch."""

    def __init__(self, arm: str, steps_per_epoch: int) -> None:
        self.arm, self.window, self.values = arm, steps_per_epoch, []

    def __call__(self, module: Any, args: tuple[Any, ...], out: Step) -> None:
        if self.arm == "orc":
            value = out.extras["false_knowledge_rate"]
        else:   # the pivot alone teaches
            value = (out.teacher_logits.argmax(1) != args[0].target).float().mean()
        self.values.append(float(value))

    def last_epoch(self) -> float:
        return statistics.fmean(self.values[-self.window:])


def notes(acc: dict[str, list[float]], mean_students: list[float], fk: dict[str, list[float]],
          picked: list[int]) -> str:
    """What was run and how to read it (the numbers come from this run)."""
    wins = sum(o > k for o, k in zip(acc["orc"], acc["kd"]))
    mean_kd = statistics.fmean(acc["kd"])
    fk_word = "lower" if statistics.fmean(fk["orc"]) < statistics.fmean(fk["kd"]) else "higher"
    return (
        f"ORC's reported student beats KD in {wins}/{len(acc['kd'])} seeds; the mean of ORC's three students "
        f"is {statistics.fmean(mean_students):.2f} vs KD {mean_kd:.2f} (reported students: {picked}). "
        "Reconstruction from the method card (the official repository has no training code): each batch "
        "the student with the lowest CE is promoted (k=1), error samples are those any student-group network "
        "misclassifies, the promoted network is refined on them only (CE 0.1 + KD 0.9 from the frozen pivot), "
        "and the mean logits of pivot + promoted network (same forward pass, detached) teach the other two "
        "(CE 0.1 + KD 0.9, T=4). Fixed hyperparameters from the card, no tuning. Same epochs, steps, data "
        "order and optimiser as the KD baseline (identical to the SGD arm of demo_dot), but ORC trains three "
        "networks (3x student compute). The reported network is the most-promoted student (a training-batch "
        "signal); the test split selects nothing. False-knowledge rate over the last epoch (teaching target "
        f"wrong on augmented training batches): KD (pivot alone) {statistics.fmean(fk['kd']):.1f}% vs ORC "
        f"{statistics.fmean(fk['orc']):.1f}% ({fk_word} with the promoted student averaged in). "
        "Exploratory seed-0 runs scored on the validation split (reported student): KD 55.4, this ORC 54.2, "
        "k=2 promoted 52.2, refinement weights 1.0 / 1.0 (the card's unweighted pseudo-code) 55.6: no variant "
        "clearly beats KD at this scale. The card's deep-mutual-learning comparison was not run."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs (smoke test, no JSON)")
    parser.add_argument("--out", default=str(ROOT / "results" / "methods" / "orc.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds, epochs = ([0], 2) if args.quick else (args.seeds, args.epochs)
    start, cpu_start = time.time(), time.process_time()
    teacher = teacher_dir()
    teacher_acc = json.loads((teacher / "result.json").read_text())["test_top1"]
    print(f"pivot {TEACHER['name']}: test top-1 {teacher_acc:.2f}", flush=True)
    acc: dict[str, list[float]] = {arm: [] for arm in ARMS}
    fk: dict[str, list[float]] = {arm: [] for arm in ARMS}
    per_student: list[list[float]] = []
    picked: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for arm in ARMS:
                trainer = Trainer(run_config(arm, seed, epochs, teacher), Path(tmp) / f"{arm}-{seed}", quiet=True)
                hook = FalseKnowledge(arm, trainer.steps_per_epoch)
                handle = trainer.distiller.register_forward_hook(hook)
                res = trainer.fit()
                handle.remove()
                acc[arm].append(res["test_top1"])
                fk[arm].append(100.0 * hook.last_epoch())
                line = f"seed {seed} {arm}: test top-1 {res['test_top1']:.2f}  false knowledge {fk[arm][-1]:.1f}%"
                if arm == "orc":
                    orc = trainer.distiller
                    accs = [evaluate(s, trainer.data.test, trainer._prepare, 500, trainer.device)["top1"]
                            for s in orc.students]
                    per_student.append(accs)
                    picked.append(orc.eval_index())
                    line += f"  students {[round(a, 2) for a in accs]} (reported: {orc.eval_index()})"
                print(f"{line}  ({res['wall_time_s']:.0f}s)", flush=True)
    wall, cpu = time.time() - start, time.process_time() - cpu_start
    delta = statistics.fmean(acc["orc"]) - statistics.fmean(acc["kd"])
    mean_students = [statistics.fmean(a) for a in per_student]
    print(f"delta top-1 {delta:+.2f}; ORC mean-of-students {statistics.fmean(mean_students):.2f}; "
          f"false knowledge kd {statistics.fmean(fk['kd']):.1f}% vs orc {statistics.fmean(fk['orc']):.1f}%; "
          f"wall {wall:.0f}s")
    if args.quick:
        return
    out = {
        "method": "orc", "task": "classification",
        "data": "procedural_cifar (20 classes / 5 superclasses, 16px, 4.5k train + 0.5k val, 2k test)",
        "metric": "test top-1 (%)",
        "baseline": "KD (T=4, CE 0.1 / KD 0.9) from the pivot teacher, single student",
        "baseline_metric": stats(acc["kd"]), "method_metric": stats(acc["orc"]),
        "delta": round(delta, 3), "seeds": seeds, "wall_time_s": round(wall, 1), "cpu_time_s": round(cpu, 1),
        "paper_claim": "ORC's students beat single-teacher KD (ImageNet R18 top-1 error 30.25 -> 28.00)",
        "direction_holds": bool(delta > 0),
        "extra": {"pivot": f"{TEACHER['name']} ({TEACHER['epochs']} epochs CE), test top-1 {teacher_acc:.2f}",
                  "student": "convnet width 8, depth 3 (x3 in ORC)", "epochs": epochs,
                  "orc_students_test_top1": [[round(a, 2) for a in s] for s in per_student],
                  "orc_reported_student": picked,
                  "orc_mean_of_students": stats(mean_students),
                  "false_knowledge_rate_last_epoch_pct": {"kd": stats(fk["kd"]), "orc": stats(fk["orc"])}},
        "notes": notes(acc, mean_students, fk, picked),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
