"""DOT vs plain SGD for the same KD student, on procedural CIFAR (CPU, a few minutes).

Data: procedural_cifar, 20 fine classes in 5 superclasses, 16x16 images, 5,000 training images
(10% held out as validation for the per-epoch curve; nothing is selected on it), 2,000 test.
Teacher: resnet8 trained with CE (seed 0, cached in $KDFORGE_CACHE/demo_teachers, shared with
the other demos). Student: convnet (width 8, 3 stages).

Both arms: vanilla KD with DOT's CIFAR-100 recipe (T=4, CE 0.1 / KD 0.9, batch 64, lr 0.05,
momentum 0.9, wd 5e-4, lr x0.1 at 150/180/210 of 240 epochs scaled to the run), identical
epochs, steps, data order and augmentation. The only difference: `optim.name=sgd` (baseline)
vs `optim.name=dot` with delta 0.075 (task momentum 0.825, distillation momentum 0.975).

Metrics: final-model test top-1 (the last epoch, no selection), and the final training CE and
KD losses (unweighted, measured on the un-augmented training split): the paper says DOT ends
with both lower ("breaking the trade-off"). Writes results/methods/dot.json.

    python benchmarks/demo_dot.py            # 3 seeds
    python benchmarks/demo_dot.py --quick    # 1 seed, few epochs (smoke test)
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdforge.config import RunConfig, load_config  # noqa: E402
from kdforge.data.cache_dir import cache_dir, cache_key  # noqa: E402
from kdforge.data.transforms import normalize, to_float  # noqa: E402
from kdforge.losses.kd import kd_loss  # noqa: E402
from kdforge.train.build import RunData  # noqa: E402
from kdforge.train.checkpoint import atomic_write_text  # noqa: E402
from kdforge.train.trainer import Trainer  # noqa: E402

T, W_CE, W_KD = 4.0, 0.1, 0.9
DATA = ["data.name=procedural_cifar",
        "data.args={num_train: 5000, num_test: 2000, num_classes: 20, num_superclasses: 5, image_size: 16}",
        "data.batch_size=64", "data.val_fraction=0.1"]
TEACHER = {"name": "resnet8", "epochs": 20, "lr": 0.05}
STUDENT = ["student.name=convnet", "student.args={width: 8, depth: 3}"]
COMMON = ["trainer.device=cpu", "trainer.progress=false", "trainer.tensorboard=false", "trainer.threads=1"]


def milestones(epochs: int) -> list[int]:
    """150/180/210 of 240 epochs, scaled."""
    return [round(epochs * f) for f in (150 / 240, 180 / 240, 210 / 240)]


def teacher_dir() -> Path:
    """Train the CE teacher once (seed 0) and cache its run directory; other demos reuse it."""
    overrides = [*DATA, f"student.name={TEACHER['name']}", f"optim.lr={TEACHER['lr']}",
                 f"schedule.milestones={milestones(TEACHER['epochs'])}", f"trainer.epochs={TEACHER['epochs']}",
                 "trainer.seed=0", *COMMON]
    run = cache_dir() / "demo_teachers" / f"{TEACHER['name']}-{cache_key({'o': overrides})}"
    if (run / "result.json").is_file():
        return run
    if (run / "checkpoints" / "last.json").is_file():   # an interrupted earlier attempt
        Trainer(load_config(None, overrides), run, resume=True, quiet=True).fit()
    else:
        Trainer(load_config(None, overrides), run, quiet=True).fit()
    return run


def student_config(optim: str, seed: int, epochs: int, teacher: Path) -> RunConfig:
    return load_config(None, [
        *DATA, *STUDENT, f"teacher.name={TEACHER['name']}", f"teacher.checkpoint={teacher}",
        "terms=[{loss: ce, teacher: null, group: task, weight: 0.1}, "
        "{loss: kd, weight: 0.9, args: {temperature: 4.0}}]",
        f"optim.name={optim}", "optim.lr=0.05", "optim.momentum=0.9", "optim.weight_decay=5e-4",
        "optim.delta=0.075", f"schedule.milestones={milestones(epochs)}",
        f"trainer.epochs={epochs}", f"trainer.seed={seed}", *COMMON])


@torch.no_grad()
def train_losses(trainer: Trainer, data: RunData) -> dict[str, float]:
    """Unweighted CE and KD (T=4) of the final student on the un-augmented training split."""
    student = trainer.distiller.eval_model().eval()
    teacher = trainer.distiller.teachers["teacher"].eval()
    ce = kd = 0.0
    n = len(data.train)
    for i in range(0, n, 500):
        x = normalize(to_float(data.train.images[i:i + 500]), data.train.mean, data.train.std)
        y = data.train.labels[i:i + 500]
        s, t = student(x), teacher(x)
        ce += float(F.cross_entropy(s, y, reduction="sum"))
        kd += float(kd_loss(s, t, T)) * len(y)
    return {"ce": ce / n, "kd": kd / n}


def stats(values: list[float]) -> dict[str, Any]:
    return {"mean": round(statistics.fmean(values), 3),
            "std": round(statistics.stdev(values), 3) if len(values) > 1 else 0.0,
            "runs": [round(v, 3) for v in values]}


def notes(base: dict[str, list[float]], dot: dict[str, list[float]], wins: int) -> str:
    """What was run and how to read it (the numbers come from this run)."""
    def m(v: list[float]) -> float:
        return statistics.fmean(v)

    return (
        f"DOT beats SGD in {wins}/{len(base['acc'])} seeds. Final training losses (unweighted, un-augmented "
        f"train split): CE {m(base['ce']):.3f} (SGD) vs {m(dot['ce']):.3f} (DOT), KD {m(base['kd']):.3f} vs "
        f"{m(dot['kd']):.3f}. Fixed recipe from the card (T=4, CE 0.1 / KD 0.9, lr 0.05, momentum 0.9, "
        "delta 0.075, wd 5e-4, batch 64, 240-epoch milestones scaled to the run); the last epoch is "
        "reported, nothing is selected on the test split. Exploratory single-seed runs scored on the "
        "validation split (40 epochs; lr 0.02; a wider convnet width 16 student) gave the same ordering "
        "(DOT 0.6-2.4 points lower validation top-1, higher final CE and KD), and an MLP student diverged "
        "under DOT at lr 0.05. " + (
            "Likely reason: momentum 0.975 on the KD gradient makes its effective step 1/(1-0.975) = 40x "
            "the lr vs 10x with SGD, which for these small students on a short schedule adds "
            "noise/instability rather than a better KD optimum; the paper's gains are for 240-epoch "
            "CIFAR-100 runs with larger students (resnet8x4 from resnet32x4). "
            if m(dot["acc"]) <= m(base["acc"]) else "") +
        "The trainer path is checked against the update rule in tests/test_dot.py."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 epochs (smoke test, no JSON)")
    parser.add_argument("--out", default=str(ROOT / "results" / "methods" / "dot.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds, epochs = ([0], 3) if args.quick else (args.seeds, args.epochs)
    start, cpu_start = time.time(), time.process_time()
    teacher = teacher_dir()
    teacher_acc = json.loads((teacher / "result.json").read_text())["test_top1"]
    print(f"teacher {TEACHER['name']}: test top-1 {teacher_acc:.2f}", flush=True)
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for arm in ("sgd", "dot"):
                cfg = student_config(arm, seed, epochs, teacher)
                # data split depends on the seed (val hold-out), so load per run
                trainer = Trainer(cfg, Path(tmp) / f"{arm}-{seed}", quiet=True)
                res = trainer.fit()
                data = trainer.data
                losses = train_losses(trainer, data)
                row = results.setdefault(arm, {"acc": [], "ce": [], "kd": []})
                row["acc"].append(res["test_top1"])
                row["ce"].append(losses["ce"])
                row["kd"].append(losses["kd"])
                print(f"seed {seed} {arm}: test top-1 {res['test_top1']:.2f}  train CE {losses['ce']:.4f}  "
                      f"train KD {losses['kd']:.4f}  ({res['wall_time_s']:.0f}s)", flush=True)
    wall, cpu = time.time() - start, time.process_time() - cpu_start
    base, dot = results["sgd"], results["dot"]
    delta = statistics.fmean(dot["acc"]) - statistics.fmean(base["acc"])
    ce_lower = statistics.fmean(dot["ce"]) < statistics.fmean(base["ce"])
    kd_lower = statistics.fmean(dot["kd"]) < statistics.fmean(base["kd"])
    wins = sum(d > b for d, b in zip(dot["acc"], base["acc"]))
    print(f"delta top-1 {delta:+.2f} (DOT better in {wins}/{len(seeds)} seeds); "
          f"CE lower: {ce_lower}; KD lower: {kd_lower}; wall {wall:.0f}s")
    if args.quick:
        return
    out = {
        "method": "dot", "task": "classification",
        "data": "procedural_cifar (20 classes / 5 superclasses, 16px, 4.5k train + 0.5k val, 2k test)",
        "metric": "test top-1 (%)",
        "baseline": "KD (T=4, CE 0.1 / KD 0.9) with SGD momentum 0.9",
        "baseline_metric": stats(base["acc"]), "method_metric": stats(dot["acc"]),
        "delta": round(delta, 3), "seeds": seeds, "wall_time_s": round(wall, 1), "cpu_time_s": round(cpu, 1),
        "paper_claim": "DOT (delta 0.075) ends with lower task and KD losses and a better KD student "
                       "(CIFAR-100 R32x4->R8x4: 73.33 -> 75.12)",
        "direction_holds": bool(delta > 0 and ce_lower and kd_lower),
        "extra": {"teacher": f"{TEACHER['name']} ({TEACHER['epochs']} epochs CE), test top-1 {teacher_acc:.2f}",
                  "student": "convnet width 8, depth 3", "epochs": epochs,
                  "final_train_ce": {"sgd": stats(base["ce"]), "dot": stats(dot["ce"])},
                  "final_train_kd": {"sgd": stats(base["kd"]), "dot": stats(dot["kd"])},
                  "dot_better_seeds": f"{wins}/{len(seeds)}"},
        "notes": notes(base, dot, wins),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
