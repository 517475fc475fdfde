"""Typed run configuration: one YAML file plus `a.b=value` overrides, validated before anything runs.

A run config is a tree of dataclasses. Loading walks the YAML mapping against the dataclass
fields, so an unknown or mistyped key fails at once with one line naming the key, its
closest valid spelling and the file it came from, instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdforge.errors import ConfigError


@dataclass
class AugmentConfig:
    """Batched, seeded train-time augmentation (see kdforge.data.transforms)."""

    crop_padding: int = 4
    flip: bool = True
    mixup: float = 0.0        # Beta(alpha, alpha) mixing of images and targets; 0 = off
    cutmix: float = 0.0       # Beta(alpha, alpha) box pasting; 0 = off


@dataclass
class DataConfig:
    name: str = "procedural_cifar"
    args: dict[str, Any] = field(default_factory=dict)    # passed to the data set factory
    root: str | None = None                               # for data sets read from disk
    batch_size: int = 64
    eval_batch_size: int = 256
    val_fraction: float = 0.0   # > 0: hold out part of train for model selection
    stream: bool = False        # decode from disk per batch in DataLoader workers (image_folder only)
    workers: int = 2            # DataLoader worker processes when streaming (0 = decode in-process)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    name: str = "resnet8x4"
    args: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None   # safetensors / .pth weights, or a kdforge run directory
    cache: str | None = None        # teacher-output cache directory (teachers only)
    device: str | None = None       # teachers only: where it runs (e.g. cuda:1 for a teacher that does not fit
                                    # beside the student); default: the run's device


@dataclass
class TermConfig:
    """One distillation (or task) loss: what it reads, how it is weighted, its loss group."""

    loss: str = "kd"
    name: str | None = None                 # defaults to the loss name
    args: dict[str, Any] = field(default_factory=dict)
    student: str | list[str] = "logits"     # tap name(s) of the student, "logits" = output
    teacher: str | list[str] | None = "logits"
    teacher_id: str = "teacher"             # which teacher (multi-teacher distillers)
    connector: str | None = None            # connector mapping student -> teacher feature shape
    connector_args: dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0
    warmup_epochs: float = 0.0              # weight ramps linearly over this many epochs
    group: str = "distill"                  # "task" | "distill" | custom


@dataclass
class ParamGroupConfig:
    """Parameters (glob patterns on their names, e.g. `*logit_scale`) trained with their own lr / weight decay."""

    params: list[str] = field(default_factory=list)
    lr_scale: float = 1.0                 # this group's lr = optim.lr * lr_scale (the schedule scales both)
    weight_decay: float | None = None     # None: optim.weight_decay


@dataclass
class OptimConfig:
    name: str = "sgd"            # sgd | adamw | dot
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    delta: float = 0.075         # DOT momentum offset
    no_decay_1d: bool = False    # no weight decay on parameters with < 2 dims (biases, norm scales, logit scale)
    groups: list[ParamGroupConfig] = field(default_factory=list)   # first matching group wins


@dataclass
class ScheduleConfig:
    name: str = "multistep"      # multistep | cosine | constant
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    min_lr: float = 0.0


@dataclass
class TrainerConfig:
    epochs: int = 240
    seed: int = 0
    device: str = "auto"         # auto | cpu | cuda | cuda:N
    amp: str = "none"            # none | auto | bf16 | fp16
    grad_clip: float | None = None
    channels_last: bool = False
    compile: bool = False
    eval_every: int = 1
    progress: bool = True
    tensorboard: bool = True
    stop_after_steps: int | None = None   # checkpoint and stop early (interruption, tests)
    threads: int | None = None
    sync_bn: bool = False        # distributed runs: batch-norm statistics over the global batch
    eval_train: bool = False     # also evaluate the final weights on the un-augmented training split
    teacher_pipeline: bool | str = "auto"   # auto | on (true) | off (false): teacher runs batch k+1 during step k
    teacher_threads: int | None = None   # CPU threads of each side while pipelined (default: threads // 2)
    teacher_precision: str = "fp32"      # fp32 | bf16: the frozen teacher's forward (outputs stay float32)
    teacher_channels_last: bool = False  # the frozen teacher's forward in channels_last memory format
    teacher_freeze: bool | str = "auto"  # auto | on | off: the teacher's forward as a frozen TorchScript graph


@dataclass
class MethodConfig:
    """A method that needs more than loss terms (its own training module), e.g. ORC, MDCS."""

    name: str | None = None
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: ModelConfig | None = None
    teachers: dict[str, ModelConfig] = field(default_factory=dict)   # extra named teachers
    terms: list[TermConfig] = field(default_factory=list)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def all_teachers(self) -> dict[str, ModelConfig]:
        out = dict(self.teachers)
        if self.teacher is not None:
            out = {"teacher": self.teacher, **out}
        return out


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str, source: str) -> Any:
    """Check/convert `value` to annotation `tp`; raise ConfigError naming `where` on mismatch."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _coerce(value, opt, where, source)
            except ConfigError as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"{source}: '{where}' has value {value!r}, expected {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{where}' must be a mapping, got {value!r}")
        return from_dict(tp, value, source, prefix=where + ".")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{where}' must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}.{i}", source) for i, v in enumerate(value)]
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{where}' must be a mapping, got {value!r}")
        return {str(k): _coerce(v, val_tp, f"{where}.{k}", source) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):   # YAML 1.1 reads "5e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{source}: '{where}' must be true or false, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{source}: '{where}' must be an integer, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{source}: '{where}' must be {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], source: str = "<config>", prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys with a did-you-mean hint."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid: {', '.join(names)})"
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(value, hints[key], prefix + key, source)
    return cls(**kwargs)


def to_dict(cfg: Any) -> Any:
    """Plain-data view of a config (for YAML and hashing)."""
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg


# ---------------------------------------------------------------------------------------------
# overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.0.c=value` -> (["a", "b", "0", "c"], parsed YAML value)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    """Set `value` at `path` in a nested dict/list tree, creating mappings as needed."""
    node: Any = tree
    for i, part in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(node, list):
            idx = _list_index(node, part, path)
            node = node[idx]
            continue
        if node.get(part) is None:
            node[part] = [] if nxt.isdigit() else {}
        node = node[part]
    last = path[-1]
    if isinstance(node, list):
        idx = _list_index(node, last, path, allow_append=True)
        if idx == len(node):
            node.append(value)
        else:
            node[idx] = value
    else:
        node[last] = value


def _list_index(node: list[Any], part: str, path: list[str], allow_append: bool = False) -> int:
    limit = len(node) + (1 if allow_append else 0)
    if not part.isdigit() or int(part) >= limit:
        raise ConfigError(f"override '{'.'.join(path)}': '{part}' is not an index of a list of "
                          f"{len(node)} items")
    return int(part)


# ---------------------------------------------------------------------------------------------
# loading / saving


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> RunConfig:
    """Read YAML (or start from `base`), apply overrides, validate into a `RunConfig`."""
    tree: dict[str, Any] = dict(base or {})
    source = "<config>"
    if path is not None:
        tree = load_yaml(path)
        source = str(path)
    for text in overrides or []:
        keys, value = parse_override(text)
        apply_override(tree, keys, value)
    if overrides:
        source += " + overrides"
    cfg = from_dict(RunConfig, tree, source)
    validate(cfg, source)
    if path is not None:
        missing = [k for k in ("data", "student") if not tree.get(k)]
        if missing:     # the defaults are a paper-scale CIFAR recipe: never launch it by omission
            raise ConfigError(f"{source}: a run config must name its {' and '.join(missing)} "
                              "(e.g. data: {name: procedural_cifar}, student: {name: convnet}); "
                              "see configs/quickstart/ for small complete recipes")
    return cfg


def validate(cfg: RunConfig, source: str = "<config>") -> None:
    """Semantic checks that types alone cannot express."""
    checks = [
        (cfg.optim.name in ("sgd", "adamw", "dot"), f"optim.name must be sgd, adamw or dot, not "
                                                    f"'{cfg.optim.name}'"),
        (cfg.schedule.name in ("multistep", "cosine", "constant"),
         f"schedule.name must be multistep, cosine or constant, not '{cfg.schedule.name}'"),
        (cfg.trainer.amp in ("none", "auto", "bf16", "fp16"),
         f"trainer.amp must be none, auto, bf16 or fp16, not '{cfg.trainer.amp}'"),
        (cfg.trainer.teacher_freeze in ("auto", "on", "off", True, False),
         f"trainer.teacher_freeze must be one of auto, on, off, not '{cfg.trainer.teacher_freeze}'"),
        (cfg.trainer.epochs >= 1, "trainer.epochs must be >= 1"),
        (cfg.data.batch_size >= 1, "data.batch_size must be >= 1"),
        (0.0 <= cfg.data.val_fraction < 1.0, "data.val_fraction must be in [0, 1)"),
        (cfg.data.workers >= 0, f"data.workers must be >= 0, not {cfg.data.workers}"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{source}: {message}")
    teachers = cfg.all_teachers()
    if cfg.student.device is not None:
        raise ConfigError(f"{source}: student.device: the student runs on trainer.device; only teachers take a "
                          "device of their own")
    for i, term in enumerate(cfg.terms):
        if term.group not in ("task", "distill") and not term.group:
            raise ConfigError(f"{source}: terms.{i}.group must be a non-empty name")
        if term.teacher is not None and term.group == "distill" and term.teacher_id not in teachers:
            raise ConfigError(f"{source}: terms.{i} ({term.loss}) reads teacher '{term.teacher_id}' "
                              f"but the config defines no such teacher")
    if cfg.optim.name == "dot" and cfg.optim.nesterov:
        raise ConfigError(f"{source}: optim.nesterov is not supported by DOT (its two momentum buffers follow the "
                          "paper's plain heavy-ball update); set optim.nesterov=false")
    if cfg.optim.name == "dot" and cfg.trainer.grad_clip:
        raise ConfigError(f"{source}: trainer.grad_clip is not supported with optim.name=dot (DOT steps the task "
                          "and distillation gradients separately); drop trainer.grad_clip")
    if cfg.optim.name == "dot" and not cfg.method.name and not any(t.group == "distill" for t in cfg.terms):
        raise ConfigError(f"{source}: optim.name=dot needs at least one term with group 'distill'")


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
