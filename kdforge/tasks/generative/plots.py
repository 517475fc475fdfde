"""Pictures across SDD runs: the same test inputs edited by each timestep policy, and HQS over t.

`plot_policy_edits` rebuilds each run's manipulator from its saved recipe (`config.yaml`) and
final weights (`checkpoints/last.safetensors`), so it needs nothing but finished run directories.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kdforge.errors import KdforgeError

__all__ = ["load_manipulator", "plot_hqs", "plot_policy_edits"]


def load_manipulator(run_dir: str | Path) -> tuple[torch.nn.Module, object]:
    """(the trained manipulator in eval mode, the run's validated SDD recipe) of a finished sdd run."""
    from kdforge.config import load_yaml
    from kdforge.methods.sdd import SDDRecipe
    from kdforge.tasks.common import load_task_config
    from kdforge.tasks.generative.models import Manipulator
    from kdforge.train.checkpoint import load_tensors
    from kdforge.train.stages import split_trainer

    run = Path(run_dir)
    weights_file = run / "checkpoints" / "last.safetensors"
    if not weights_file.is_file() or not (run / "config.yaml").is_file():
        raise KdforgeError(f"{run} is not a finished sdd run (no config.yaml or checkpoints/last.safetensors)")
    body, _ = split_trainer(load_yaml(run / "config.yaml"), str(run / "config.yaml"))
    cfg = load_task_config(SDDRecipe, body, name=str(run / "config.yaml"))
    net = Manipulator(cfg.data.size, 1, cfg.manipulator.width, cfg.manipulator.bottleneck)
    state = {k[len("student."):]: v for k, v in load_tensors(weights_file).items() if k.startswith("student.")}
    net.load_state_dict(state)
    return net.eval(), cfg


@torch.no_grad()
def plot_policy_edits(runs: dict[str, str | Path], path: str | Path, count: int = 8) -> Path:
    """One row of test inputs, then one row of edits per run (label -> run directory), same inputs."""
    from kdforge.methods.sdd import make_splits
    from kdforge.plotting import pyplot, save_png

    loaded = {name: load_manipulator(run) for name, run in runs.items()}
    first = next(iter(loaded.values()))[1]
    x = make_splits(first.data, first.sdd.source, first.manipulator)["edit_test"].images[:count]
    rows = [("input", x)] + [(name, net(x).clamp(-1, 1)) for name, (net, _) in loaded.items()]
    plt = pyplot()
    fig, axes = plt.subplots(len(rows), count, figsize=(1.0 * count, 1.05 * len(rows)), squeeze=False)
    for i, (name, imgs) in enumerate(rows):
        for j in range(count):
            axes[i, j].imshow(imgs[j, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
        axes[i, 0].set_ylabel(name, fontsize=7)
    fig.suptitle("the same test inputs edited by manipulators trained at each timestep policy", fontsize=8)
    fig.tight_layout()
    return save_png(fig, path, dpi=80)


def plot_hqs(result_file: str | Path, path: str | Path) -> Path:
    """HQS_t with its normalised-out parts (mean entropy, mean L1 magnitude) from an sdd run's result.json."""
    from kdforge.plotting import pyplot, save_png

    r = json.loads(Path(result_file).read_text())
    if "hqs" not in r:
        raise KdforgeError(f"{result_file} holds no HQS curve (not an sdd manipulator result)")
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3))
    a1.plot(r["hqs_grid"], r["hqs"], "o-")
    a1.set_xlabel("t")
    a1.set_ylabel("HQS_t = mean(N - H), normalised")
    a1.axhline(0, color="gray", lw=0.5)
    a2.plot(r["hqs_grid"], r["hqs_entropy"], "s-", color="tab:red", label="entropy H")
    a2.set_xlabel("t")
    a2.set_ylabel("entropy H (nats)", color="tab:red")
    b = a2.twinx()
    b.plot(r["hqs_grid"], r["hqs_magnitude"], "^-", color="tab:green")
    b.set_ylabel("L1 magnitude N", color="tab:green")
    fig.suptitle("SDD timestep search on the frozen bar DDPM (target: vertical)", fontsize=9)
    fig.tight_layout()
    return save_png(fig, path, dpi=80)
