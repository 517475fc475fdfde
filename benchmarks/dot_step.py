"""Cost of one DOT step vs one plain KD step (forward + backward + update), median ms/step.

Variants, each on its own copy of the same student, timed in interleaved rounds so that
background load hits all of them alike:

* ``kd``: one backward of ``ce + kd``, then ``torch.optim.SGD(momentum=0.9)``.
* ``dot_ref``: the official protocol: ``kd.backward(retain_graph=True); step_kd();
  ce.backward(); step()``.
* ``dot_fast``: ``DOT.step_losses`` with the default gradient path (``grad_mode="auto"``).
* ``dot_batched``: ``DOT.step_losses`` with one vmapped backward (``grad_mode="batched"``).

The teacher is a fixed random logits tensor, so teacher cost is not counted. The last line is
``dot_vs_kd=<ratio> dot_fast_vs_kd=<ratio>``.

    python benchmarks/dot_step.py --quick
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import kdforge  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdforge.methods.dot import DOT  # noqa: E402

T, W_CE, W_KD = 4.0, 0.1, 0.9  # DOT's CIFAR-100 KD setting


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(out)) + self.short(x))


class _ResNet8x4(nn.Module):
    """Fallback with the resnet8x4 layout (stem 32, one block per stage at 64/128/256)."""

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.layers = nn.Sequential(_Block(32, 64, 1), _Block(64, 128, 2), _Block(128, 256, 2))
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


def build_student(num_classes: int) -> tuple[nn.Module, str]:
    """resnet8x4 from ``kdforge.models.create_model`` when that exists, else the local copy."""
    try:
        from kdforge.models import create_model  # type: ignore[attr-defined]

        return create_model("resnet8x4", num_classes=num_classes), "kdforge.models"
    except (ImportError, AttributeError):
        return _ResNet8x4(num_classes), "local fallback"


def split_losses(model: nn.Module, x: Tensor, y: Tensor, t_logits: Tensor) -> tuple[Tensor, Tensor]:
    logits = model(x)
    ce = W_CE * F.cross_entropy(logits, y)
    kd = F.kl_div(F.log_softmax(logits / T, 1), F.softmax(t_logits / T, 1), reduction="batchmean")
    return ce, W_KD * kd * T * T


def make_steps(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, Callable[[], None]], str]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 100, (args.batch_size,), generator=g).to(device)
    t_logits = (torch.randn(args.batch_size, 100, generator=g) * 3).to(device)
    torch.manual_seed(0)
    base, source = build_student(100)
    base = base.to(device).train()

    hp = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    m_kd, m_ref, m_fast, m_bat = (copy.deepcopy(base) for _ in range(4))
    sgd = torch.optim.SGD(m_kd.parameters(), **hp)
    o_ref = DOT(m_ref.parameters(), delta=0.075, **hp)
    o_fast = DOT(m_fast.parameters(), delta=0.075, **hp)
    o_bat = DOT(m_bat.parameters(), delta=0.075, grad_mode="batched", **hp)

    def kd_step() -> None:
        ce, kd = split_losses(m_kd, x, y, t_logits)
        sgd.zero_grad(set_to_none=True)
        (ce + kd).backward()
        sgd.step()

    def dot_ref_step() -> None:
        ce, kd = split_losses(m_ref, x, y, t_logits)
        o_ref.zero_grad(set_to_none=True)
        kd.backward(retain_graph=True)
        o_ref.step_kd()
        o_ref.zero_grad(set_to_none=True)
        ce.backward()
        o_ref.step()

    def dot_fast_step() -> None:
        o_fast.step_losses(*split_losses(m_fast, x, y, t_logits))

    def dot_batched_step() -> None:
        o_bat.step_losses(*split_losses(m_bat, x, y, t_logits))

    steps = dict(kd=kd_step, dot_ref=dot_ref_step, dot_fast=dot_fast_step, dot_batched=dot_batched_step)
    return steps, source


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 3 timed rounds")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10, help="timed rounds (each runs every variant once)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 3, 1
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    steps, source = make_steps(args, device)
    for _ in range(args.warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.repeats):
        for name, fn in steps.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - t0) * 1e3)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"student=resnet8x4 ({source}) device={device} batch={args.batch_size} "
        f"threads={torch.get_num_threads()} rounds={args.repeats} torch={torch.__version__}"
    )
    for name, v in times.items():
        print(f"{name:12s} median {med[name]:9.1f} ms/step  (min {min(v):9.1f}, max {max(v):9.1f})")
    print(f"dot_batched_vs_kd={med['dot_batched'] / med['kd']:.3f}")
    print(f"dot_vs_kd={med['dot_ref'] / med['kd']:.3f} dot_fast_vs_kd={med['dot_fast'] / med['kd']:.3f}")


if __name__ == "__main__":
    main()
