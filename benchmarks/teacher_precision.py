"""The frozen teacher's forward in fp32 vs bf16 autocast vs channels_last vs a frozen graph on CPU: speed, top-1.

Why: online KD pays a teacher forward every step; `trainer.teacher_precision` (fp32 | bf16),
`trainer.teacher_channels_last` and `trainer.teacher_freeze` (a frozen TorchScript graph, BN
folded and weights prepacked for oneDNN; float32) make it cheaper where the hardware has it
(AVX512-BF16 / AMX CPUs for bf16), but only if the teacher's predictions stay the same. This
script measures every mode in one run: the median ms of a batch-64 teacher forward for each
mode (interleaved rounds, for the demo's teacher and for resnet32x4 at 32x32), and the demo
teacher's test top-1 on the demo data in each mode. A mode qualifies as the default when its
top-1 is within 0.1 points of fp32's; the fastest qualifying mode (more than 5% faster than
fp32, else fp32) is printed as ``default=<mode>`` with the speed ratios.

    python benchmarks/teacher_precision.py                       # trains the demo teacher first
    python benchmarks/teacher_precision.py --teacher-run runs/demo/teacher
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    import kdforge  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import machine_description  # noqa: E402  (benchmarks/ is on sys.path)

from kdforge.data.transforms import normalize, to_float  # noqa: E402
from kdforge.demo import demo_configs  # noqa: E402
from kdforge.distill.distiller import Distiller  # noqa: E402
from kdforge.distill.terms import Term  # noqa: E402
from kdforge.models import create_model  # noqa: E402
from kdforge.train.build import load_data  # noqa: E402
from kdforge.train.checkpoint import atomic_write_text, load_checkpoint  # noqa: E402
from kdforge.train.trainer import Trainer  # noqa: E402

MODES = {"fp32": (None, False, False), "bf16": (torch.bfloat16, False, False), "channels_last": (None, True, False),
         "bf16+channels_last": (torch.bfloat16, True, False), "frozen": (None, False, True)}


def _distiller(teacher: torch.nn.Module, mode: str) -> Distiller:
    d = Distiller(torch.nn.Identity(), teacher, [Term("kd", weight=1.0)])
    d.is_setup = True                         # no terms to probe; the frozen graph serves set-up distillers
    dtype, channels_last, freeze = MODES[mode]
    d.set_teacher_execution(dtype, channels_last, freeze=freeze, log=print)
    return d


def _top1(teacher: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, mean, std, mode: str) -> float:
    d, correct = _distiller(teacher, mode), 0
    for start in range(0, len(images), 256):
        x = normalize(to_float(images[start:start + 256]), mean, std)
        correct += int((d.teacher_outputs(x)["teacher"]["logits"].argmax(1) == labels[start:start + 256]).sum())
    return 100.0 * correct / len(images)


def _time(models: dict[str, tuple[torch.nn.Module, torch.Tensor]], rounds: int) -> dict[str, dict[str, float]]:
    """Median ms of one teacher forward per (model, mode), modes interleaved in every round."""
    out: dict[str, dict[str, float]] = {}
    for name, (teacher, x) in models.items():
        ds = {mode: _distiller(teacher, mode) for mode in MODES}
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        for r in range(rounds + 1):
            for mode, d in ds.items():
                t0 = time.perf_counter()
                d.teacher_outputs(x)
                if r:                                        # round 0 warms up
                    times[mode].append((time.perf_counter() - t0) * 1e3)
        out[name] = {mode: statistics.median(v) for mode, v in times.items()}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher-run", help="a finished demo teacher run (default: train one here, seed 0)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results" / "teacher_precision.md"))
    args = ap.parse_args(argv)
    command = " ".join(["python", f"benchmarks/{Path(__file__).name}", *(argv if argv is not None else sys.argv[1:])])
    torch.set_num_threads(args.threads)
    machine = machine_description(torch.device("cpu"), args.threads)
    cfg = demo_configs(0, quick=False)["teacher"]
    data = load_data(cfg.data, cfg.trainer.seed)
    teacher = create_model(cfg.student.name, num_classes=data.train.num_classes, **cfg.student.args)
    with tempfile.TemporaryDirectory(prefix="kdforge-precision-") as tmp:
        run = args.teacher_run
        if run is None:
            run = str(Path(tmp) / "teacher")
            cfg.trainer.progress = False
            print(f"training the demo teacher ({cfg.student.name} width {cfg.student.args['width']}, "
                  f"{cfg.trainer.epochs} epochs) ...", flush=True)
            Trainer(cfg, run, data=data, quiet=True).fit()
        weights, _, _ = load_checkpoint(Path(run) / "checkpoints", "last")
    teacher.load_state_dict({k.removeprefix("student."): v for k, v in weights.items() if k.startswith("student.")})
    teacher.eval()
    test = data.test
    top1 = {mode: _top1(teacher, test.images, test.labels, data.train.mean, data.train.std, mode) for mode in MODES}
    torch.manual_seed(0)
    big = create_model("resnet32x4", num_classes=100).eval()
    x16 = normalize(to_float(test.images[:64]), data.train.mean, data.train.std)
    timing = _time({"demo teacher (convnet w64, 16x16)": (teacher, x16),
                    "resnet32x4 (32x32)": (big, torch.randn(64, 3, 32, 32))}, args.rounds)
    qualifying = [m for m in MODES if abs(top1[m] - top1["fp32"]) <= 0.1]
    speed = {m: statistics.mean(t["fp32"] / t[m] for t in timing.values()) for m in MODES}
    # a mode must beat fp32 by more than timing noise (5%) to replace it
    default = max(qualifying, key=lambda m: speed[m] if m == "fp32" or speed[m] > 1.05 else 0.0)

    md = ["# The teacher's forward: fp32 vs bf16 autocast vs channels_last vs a frozen graph (CPU)", "",
          f"Batch 64, median of {args.rounds} interleaved rounds, {args.threads} threads. Top-1: the demo teacher "
          f"({cfg.student.name} width {cfg.student.args['width']}, {cfg.trainer.epochs} epochs, seed 0) on the demo's "
          f"{len(test.labels)} test images.", "",
          "| mode | " + " | ".join(f"{n} ms" for n in timing) + " | speed-up vs fp32 (mean) | demo teacher top-1 |",
          "|---|" + "---:|" * (len(timing) + 2)]
    for m in MODES:
        md.append(f"| {m} | " + " | ".join(f"{t[m]:.1f}" for t in timing.values())
                  + f" | {speed[m]:.2f}x | {top1[m]:.2f} |")
    md += ["", f"**default={default}**: the fastest mode whose top-1 is within 0.1 points of fp32's "
           f"(qualifying: {', '.join(qualifying)}); a mode must be more than 5% faster than fp32 to replace it.",
           "", "Machine:", *[f"- {line}" for line in machine], "", f"Command: `{command}`"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "\n".join(md) + "\n")
    print("\n".join(md))
    print(f"\nwrote {out}")
    print(f"default={default} " + " ".join(f"{m}_vs_fp32={speed[m]:.2f}" for m in MODES))


if __name__ == "__main__":
    main()
