"""Turn a validated RunConfig into data, models and the distiller (or a method's training module)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import kdforge.losses  # noqa: F401  (registers the losses)
from kdforge.config import DataConfig, ModelConfig, RunConfig, TermConfig
from kdforge.data import load_split
from kdforge.data.base import ImageTensors
from kdforge.data.stream import StreamingImages
from kdforge.distill.distiller import Distiller
from kdforge.distill.terms import term_from_config
from kdforge.errors import KdforgeError
from kdforge.models import adapt_reference_state_dict, create_model
from kdforge.registry import METHODS


@dataclass
class RunData:
    """The splits of a run: in-memory tensors, or streamed from disk when `data.stream` is set."""

    train: ImageTensors | StreamingImages
    eval: ImageTensors | StreamingImages   # validation split when data.val_fraction > 0, else the test split
    test: ImageTensors | StreamingImages
    eval_name: str


def load_data(cfg: DataConfig, seed: int) -> RunData:
    train = load_split(cfg.name, "train", cfg.root, stream=cfg.stream, **cfg.args)
    test = load_split(cfg.name, "test", cfg.root, stream=cfg.stream, **cfg.args)
    if cfg.val_fraction > 0:
        gen = torch.Generator().manual_seed(seed + 7919)
        perm = torch.randperm(len(train), generator=gen)
        n_val = max(1, int(round(len(train) * cfg.val_fraction)))
        return RunData(train.subset(perm[n_val:].sort().values), train.subset(perm[:n_val].sort().values),
                       test, "val")
    return RunData(train, test, test, "test")


def build_model(cfg: ModelConfig, num_classes: int, in_channels: int, role: str) -> nn.Module:
    model = create_model(cfg.name, num_classes=num_classes, in_channels=in_channels, **cfg.args)
    if cfg.checkpoint:
        load_weights(model, cfg.checkpoint, f"{role} ({cfg.name})")
    return model


def _weights_file(path: Path) -> Path:
    """A run directory resolves to its last checkpoint; a file is used as is."""
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.safetensors", path / "model.safetensors"):
            if candidate.is_file():
                return candidate
        raise KdforgeError(f"no checkpoint in {path} (expected checkpoints/last.safetensors)")
    if not path.is_file():
        raise KdforgeError(f"checkpoint not found: {path}")
    return path


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Weights from safetensors, a kdforge run, or a torch .pth/.pt (RepDistiller/mdistiller style)."""
    file = _weights_file(Path(path).expanduser())
    if file.suffix == ".safetensors":
        from kdforge.train.checkpoint import load_tensors

        state = load_tensors(file)
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:
            raise KdforgeError(f"cannot read checkpoint {file}: {str(err).splitlines()[0]}") from None
        for key in ("model", "state_dict", "net"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise KdforgeError(f"checkpoint {file} holds no state dict")
    if any(k.startswith("student.") for k in state):   # a kdforge run checkpoint
        state = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(model: nn.Module, path: str | Path, what: str) -> None:
    """Strict load with one clear line when the checkpoint is of another architecture."""
    state = adapt_reference_state_dict(model, read_state_dict(path))
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    head = [k for k in wrong if k.startswith("fc.")]
    if head and len(head) == len(wrong) and not missing and not unexpected:
        raise KdforgeError(f"checkpoint {path} predicts {state['fc.weight'].shape[0]} classes but {what} is built "
                           f"for {own['fc.weight'].shape[0]} (the data's class count); teacher and student must "
                           "share the label space")
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatches (e.g. {k}: checkpoint {tuple(state[k].shape)} "
                         f"vs model {tuple(own[k].shape)})")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise KdforgeError(f"checkpoint {path} does not fit {what}: {'; '.join(parts)}")
    model.load_state_dict(state)


def default_terms(cfg: RunConfig) -> list[TermConfig]:
    """No terms given: plain cross-entropy (a scratch run)."""
    return cfg.terms or [TermConfig(loss="ce", teacher=None, group="task")]


def build_distiller(cfg: RunConfig, data: RunData) -> Distiller:
    """Student, frozen teachers (weights loaded) and terms; a method may supply its own module."""
    c, _, _ = data.train.image_shape
    num_classes = data.train.num_classes
    student = build_model(cfg.student, num_classes, c, "student")
    teachers = {tid: build_model(t, num_classes, c, f"teacher '{tid}'") for tid, t in cfg.all_teachers().items()}
    for tid, t in cfg.all_teachers().items():
        if t.cache and tid != "teacher":
            raise KdforgeError(f"teachers.{tid}.cache: only the main teacher can be read from a cache")
        if not t.checkpoint and not t.cache:
            raise KdforgeError(f"teacher '{tid}' ({t.name}) has no checkpoint: set teacher.checkpoint to "
                               "a trained run directory or weights file")
    terms = [term_from_config(t) for t in default_terms(cfg)]
    if cfg.method.name:
        from kdforge.methods.catalog import import_methods

        import_methods()     # method modules register themselves on import
        factory = METHODS.get(cfg.method.name)
        build = getattr(factory, "build_module", None)
        if build is None and hasattr(factory, "run_config"):
            raise KdforgeError(f"method '{cfg.method.name}' is a task recipe, not a run config's method: write "
                               f"`method: {cfg.method.name}` at the top of its recipe (configs/methods/ or the "
                               "package's configs/) and run kdforge train RECIPE --out DIR")
        if build is None:
            raise KdforgeError(f"method '{cfg.method.name}' is not a training module; see its docs for "
                               "how to select it (e.g. optim.name=dot)")
        return build(cfg=cfg, student=student, teachers=teachers, terms=terms, data=data, **cfg.method.args)
    return Distiller(student, teachers, terms)
