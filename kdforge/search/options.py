"""Search options: a small YAML next to the run config, plus `search.key=value` overrides.

`kdforge search autokd configs/search/autokd.yaml` reads the run config (a normal RunConfig:
data, student, teacher, optim, trainer) and, if it exists, ``configs/search/autokd.search.yaml``
(the config's path with ``.search.yaml`` instead of ``.yaml``) with the options below. Overrides
starting with ``search.`` go to the options, all others to the run config. Unknown option keys
fail with one line naming the key, like run configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdforge.config import apply_override, from_dict, load_yaml, parse_override
from kdforge.errors import ConfigError


@dataclass
class AutoKDOptions:
    """Auto-KD: the tree's decision options, proxy training and reward (see kdforge.search.autokd)."""

    trials: int = 30                  # fresh proxy evaluations (the budget)
    seed: int = 0                     # tree randomness, proxy student initialisation, data subset
    exploration: float = 1.4          # UCT constant c (rewards are min-max normalised to [0, 1])
    strategy: str = "mcts"            # mcts | random (uniform distillers, the equal-budget baseline)
    logits: bool = True               # the logits are a candidate input
    layers: dict[str, str] = field(default_factory=lambda: {"feat3": "feat3"})   # student tap -> teacher tap
    multi_layer: bool = True          # all `layers` at once, training-free layer weights (needs >= 2)
    global_transforms: list[str] = field(default_factory=lambda: [
        "none", "spatial_attention", "channel_attention", "mask_random", "mask_teacher"])
    intra_transforms: list[str] = field(default_factory=lambda: ["none", "patches", "multiscale"])
    inter_transforms: list[str] = field(default_factory=lambda: ["none", "channel"])
    distances: list[str] = field(default_factory=lambda: ["mse", "gl2", "cosine", "pearson", "kl", "cs"])
    registered: list[str] | None = None   # registered losses offered on raw inputs; None = all that fit
    exclude: list[str] = field(default_factory=list)   # registered losses never offered
    temperatures: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])
    alphas: list[float] = field(default_factory=lambda: [0.5, 0.75, 0.9])   # CE weight 1 - alpha
    mask_ratio: float = 0.5
    subset: float = 0.2               # fraction of the training split the proxy trains on
    proxy_steps: int = 300            # optimizer steps per proxy run (at most)
    eval_every: int = 50              # proxy validation every this many steps
    patience: int = 3                 # early stop after this many evaluations without a better reward
    sparsity: float = 0.0             # fixed random weight mask on the proxy student (paper: 0.5)
    gamma: float = 1.0                # reward = -(val CE + gamma * (1 - CKA))
    cka_tap: str = "pool"             # student/teacher tap compared by CKA ("logits" allowed)
    cache_epochs: int = 2             # augmented views per sample in the proxy's teacher cache (K)
    weight_tau: float = 0.5           # softmax temperature of the training-free layer/teacher weights
    study_name: str = "autokd"


@dataclass
class BOSSOptions:
    """BOSS: Bayesian optimisation (TPE) of training hyperparameters with self-distillation trials."""

    trials: int = 24                  # total trials (warm-up included)
    warmup: int = 8                   # plain BO trials trained from scratch with CE
    top_k: int = 4                    # teacher / initialisation drawn from the k best finished trials
    mode: str = "boss"                # boss | bo (the plain-BO baseline: every trial CE from scratch)
    pretrained: bool = True           # BOSS trials start from a top-k checkpoint (else from scratch)
    merge_studies: bool = False       # True: one study for both phases (the official code keeps two)
    seed: int = 0
    lr: list[float] = field(default_factory=lambda: [1e-3, 1.0])                # log-uniform
    weight_decay: list[float] = field(default_factory=lambda: [1e-5, 1e-2])     # log-uniform
    one_minus_momentum: list[float] = field(default_factory=lambda: [1e-3, 1.0])   # log-uniform
    batch_size: list[int] = field(default_factory=lambda: [64, 256])            # int uniform
    alpha: list[float] = field(default_factory=lambda: [0.0, 1.0])              # CE weight; MSE 1 - alpha
    epochs: int | None = None         # epochs per trial (default: trainer.epochs of the run config)
    tpe_startup: int = 10             # random trials before TPE models the scores (Optuna's default)
    study_name: str = "boss"


def options_path(config: str | Path) -> Path:
    """The search options file that belongs to a run config: X.yaml -> X.search.yaml."""
    path = Path(config)
    return path.with_name(path.name.removesuffix(".yaml").removesuffix(".yml") + ".search.yaml")


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(run-config overrides, search-option overrides without the `search.` prefix)."""
    run, search = [], []
    for text in overrides:
        (search if text.startswith("search.") else run).append(text.removeprefix("search."))
    return run, search


def load_options(cls: type, config: str | Path | None, overrides: list[str]) -> Any:
    """Options of type `cls` from the sibling `.search.yaml` (if any) plus overrides."""
    tree: dict[str, Any] = {}
    source = "<search options>"
    if config is not None and options_path(config).is_file():
        source = str(options_path(config))
        tree = load_yaml(source)
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(tree, keys, value)
    if overrides:
        source += " + search overrides"
    opts = from_dict(cls, tree, source)
    _validate(opts, source)
    return opts


def _validate(opts: Any, source: str) -> None:
    checks: list[tuple[bool, str]] = [(opts.trials >= 1, "trials must be >= 1")]
    if isinstance(opts, AutoKDOptions):
        checks += [
            (0.0 < opts.subset <= 1.0, "subset must be in (0, 1]"),
            (opts.proxy_steps >= 1 and opts.eval_every >= 1, "proxy_steps and eval_every must be >= 1"),
            (opts.patience >= 1, "patience must be >= 1"),
            (0.0 <= opts.sparsity < 1.0, "sparsity must be in [0, 1)"),
            (opts.cache_epochs >= 1, "cache_epochs must be >= 1"),
            (opts.gamma >= 0, "gamma must be >= 0"),
            (all(0.0 < a <= 1.0 for a in opts.alphas) and bool(opts.alphas), "alphas must be in (0, 1]"),
            (all(t > 0 for t in opts.temperatures) and bool(opts.temperatures), "temperatures must be > 0"),
            (opts.logits or bool(opts.layers), "the space needs logits: true or at least one layer"),
            (opts.strategy in ("mcts", "random"), f"strategy must be mcts or random, not '{opts.strategy}'"),
        ]
    else:
        checks += [
            (opts.mode in ("boss", "bo"), f"mode must be boss or bo, not '{opts.mode}'"),
            (opts.top_k >= (2 if opts.pretrained else 1), "top_k must be >= 2 (>= 1 with pretrained: false)"),
            (opts.mode == "bo" or opts.warmup >= (2 if opts.pretrained else 1),
             "warmup must be >= 2 (>= 1 with pretrained: false): BOSS draws checkpoints from finished "
             "trials"),
            (opts.mode == "bo" or opts.warmup < opts.trials, "warmup must be < trials"),
            (opts.epochs is None or opts.epochs >= 1, "epochs must be >= 1"),
            (opts.tpe_startup >= 1, "tpe_startup must be >= 1"),
        ]
        for name in ("lr", "weight_decay", "one_minus_momentum", "batch_size", "alpha"):
            lo_hi = getattr(opts, name)
            checks.append((len(lo_hi) == 2 and lo_hi[0] <= lo_hi[1], f"{name} must be [low, high]"))
        checks += [(opts.lr[0] > 0 and opts.weight_decay[0] > 0 and opts.one_minus_momentum[0] > 0
                    and opts.one_minus_momentum[1] <= 1.0,
                    "log-uniform ranges must be > 0 (1 - momentum <= 1)"),
                   (opts.batch_size[0] >= 1 and 0.0 <= opts.alpha[0] and opts.alpha[1] <= 1.0,
                    "batch_size must be >= 1 and alpha within [0, 1]")]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{source}: {message}")
