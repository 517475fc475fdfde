"""The Auto-KD search space, built from the options and from what kdforge registers.

A complete path is seven decisions (each depth of the tree is one)::

    0 input        logits | <student tap> (one layer pair of `layers`) | multi (every feature layer)
    1 global       none | spatial_attention | channel_attention | mask_random | mask_teacher
    2 intra        none | patches | multiscale
    3 inter        none | channel
    4 distance     mse | gl2 | cosine | pearson | kl | cs | loss:<registered kdforge loss>
    5 temperature  T of softened distances (kl, cs, losses taking `temperature`), else None
    6 alpha        CE weight 1 - alpha; the distillation terms share alpha

Options depend on the prefix: logits and pooled (N, D) inputs take no transforms; a transform
is offered only where it is defined on the shapes it would see (patches need an even grid,
multi-scale pooling at least 2x2, channel rows at least two positions); registered losses
(every `LOSSES` entry of group "distill" whose ``inputs`` metadata fits: "logits", "features" or
"pooled", that builds and runs on the probed shapes) are offered on raw inputs only, since they
do their own transforms.

A path compiles into `TermConfig`s: the equivalent registered loss where one exists (KL on raw
logits is `kd`, MSE on raw connected features is `fitnet`), else the parametrised
`autokd_distill` loss. Feature inputs pass a 1x1-conv connector (pooled: linear), as the card says.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

import kdforge.losses  # noqa: F401  (registers the losses)
from kdforge.config import TermConfig
from kdforge.distill.terms import LOGITS, Term
from kdforge.errors import KdforgeError
from kdforge.losses.autokd import DISTANCES, GLOBAL, INTER, INTRA, SCALES, SOFT_DISTANCES
from kdforge.losses.base import LossContext
from kdforge.registry import LOSSES
from kdforge.search.options import AutoKDOptions

Shape = tuple[int, ...]
MULTI = "multi"
REGISTERED_PREFIX = "loss:"
LEVELS = ("input", "global", "intra", "inter", "distance", "temperature", "alpha")


def input_kind(shape: Shape, name: str) -> str:
    """logits | pooled | features, from a tap's probed (batch-including) shape."""
    if name == LOGITS:
        return "logits"
    return "features" if len(shape) == 4 else "pooled"


def takes_temperature(loss_name: str) -> bool:
    return "temperature" in inspect.signature(LOSSES.get(loss_name)).parameters


@dataclass
class Candidate:
    """A compiled path: the distillation terms (weights before normalisation) and alpha."""

    path: tuple[Hashable, ...]
    alpha: float
    terms: list[TermConfig] = field(default_factory=list)

    def describe(self) -> str:
        parts = [f"{LEVELS[i]}={v}" for i, v in enumerate(self.path) if v not in ("none", None)]
        return " ".join(parts)


class AutoKDSpace:
    """Options per prefix and path -> terms, for given student/teacher tap shapes."""

    def __init__(self, options: AutoKDOptions, student_shapes: dict[str, Shape],
                 teacher_shapes: dict[str, dict[str, Shape]], num_samples: int = 64) -> None:
        self.opts = options
        self.student_shapes = dict(student_shapes)
        self.teacher_shapes = {tid: dict(s) for tid, s in teacher_shapes.items()}
        if not self.teacher_shapes:
            raise KdforgeError("autokd: the run config defines no teacher to distil from")
        self._check_names()
        self.layers: dict[str, tuple[str, str]] = {}       # input option -> (student tap, teacher tap)
        self.kinds: dict[str, str] = {}
        if options.logits:
            self.layers[LOGITS] = (LOGITS, LOGITS)
            self.kinds[LOGITS] = "logits"
        for s_tap, t_tap in options.layers.items():
            if s_tap == MULTI or s_tap == LOGITS:
                raise KdforgeError(f"autokd: '{s_tap}' is reserved; name layers by their student tap")
            self._check_tap(s_tap, t_tap)
            self.layers[s_tap] = (s_tap, t_tap)
            self.kinds[s_tap] = input_kind(self.student_shapes[s_tap], s_tap)
        self.feature_layers = [k for k, v in self.kinds.items() if v == "features"]
        multi = options.multi_layer and len(self.feature_layers) >= 2
        self.inputs = list(self.layers) + ([MULTI] if multi else [])
        self.registered = {kind: self._applicable(kind, num_samples) for kind in set(self.kinds.values())}

    # -- validation -------------------------------------------------------------------------

    def _check_names(self) -> None:
        o = self.opts
        for values, known, what in ((o.global_transforms, GLOBAL, "global_transforms"),
                                    (o.intra_transforms, INTRA, "intra_transforms"),
                                    (o.inter_transforms, INTER, "inter_transforms"),
                                    (o.distances, DISTANCES, "distances")):
            bad = [v for v in values if v not in known]
            if bad:
                raise KdforgeError(f"autokd: unknown {what} {bad}; known: {', '.join(known)}")
            if "none" in known and "none" not in values:
                raise KdforgeError(f"autokd: {what} must include 'none' (logits and pooled inputs need it)")
        if not o.distances and o.registered == []:
            raise KdforgeError("autokd: no distance to search (distances and registered are both empty)")

    def _check_tap(self, s_tap: str, t_tap: str) -> None:
        if s_tap not in self.student_shapes:
            raise KdforgeError(f"autokd: layers names student tap '{s_tap}' which was not probed")
        for tid, shapes in self.teacher_shapes.items():
            if t_tap not in shapes:
                raise KdforgeError(f"autokd: teacher '{tid}' has no probed tap '{t_tap}'")
            if len(shapes[t_tap]) != len(self.student_shapes[s_tap]):
                raise KdforgeError(f"autokd: student tap '{s_tap}' {self.student_shapes[s_tap]} and teacher "
                                   f"tap '{t_tap}' {shapes[t_tap]} have different ranks")

    def _applicable(self, kind: str, num_samples: int) -> list[str]:
        """Registered distillation losses for inputs of `kind` that build and run on the probed shapes."""
        wanted = self.opts.registered
        out = []
        for name in LOSSES.names():
            meta = LOSSES.meta(name)
            if (meta.get("group") != "distill" or meta.get("inputs") != kind or name == "autokd_distill"
                    or name in self.opts.exclude or (wanted is not None and name not in wanted)):
                continue
            if self._probe(name, kind, num_samples):
                out.append(name)
        if wanted is not None:
            unknown = [n for n in wanted if n not in LOSSES]
            if unknown:
                raise KdforgeError(f"autokd: registered names unknown losses {unknown}")
        return out

    def _probe(self, name: str, kind: str, num_samples: int) -> bool:
        layer = next(k for k, v in self.kinds.items() if v == kind)
        s_tap, t_tap = self.layers[layer]
        t_shape = next(iter(self.teacher_shapes.values()))[t_tap]
        s_shape = self.student_shapes[s_tap]
        conn = None if kind == "logits" else ("conv1x1" if kind == "features" else "linear")
        gen = torch.Generator().manual_seed(0)
        try:
            term = Term(name, s_tap, t_tap, connector=conn)
            term.setup([s_shape], [t_shape], max(num_samples, 8))
            n = s_shape[0]
            s = torch.randn(s_shape, generator=gen)
            t = torch.randn(t_shape, generator=gen)
            ctx = LossContext(target=torch.zeros(n, dtype=torch.long), index=torch.arange(n))
            value = term([s], [t], ctx)
            return bool(value.dim() == 0 and torch.isfinite(value))
        except Exception:   # a loss that does not fit these inputs is simply not offered
            return False

    # -- the tree's options -----------------------------------------------------------------

    def _shapes(self, inp: str) -> list[Shape]:
        """Teacher shapes (what both sides have after the connector) of every layer the input reads."""
        layers = self.feature_layers if inp == MULTI else [inp]
        return [shapes[self.layers[name][1]] for name in layers for shapes in self.teacher_shapes.values()]

    def _kind(self, inp: str) -> str:
        return "features" if inp == MULTI else self.kinds[inp]

    def options(self, prefix: tuple[Hashable, ...]) -> list[Hashable]:
        depth = len(prefix)
        o = self.opts
        if depth == 0:
            return list(self.inputs)
        inp = str(prefix[0])
        feats = self._kind(inp) == "features"
        shapes = self._shapes(inp)
        if depth == 1:
            return list(o.global_transforms) if feats else ["none"]
        g = prefix[1]
        hw = [(1, 1) if g == "channel_attention" else (s[2], s[3]) for s in shapes] if feats else []
        if depth == 2:
            if not feats:
                return ["none"]
            opts = ["none"]
            if "patches" in o.intra_transforms and all(h % 2 == 0 and w % 2 == 0 and h >= 2 for h, w in hw):
                opts.append("patches")
            if "multiscale" in o.intra_transforms and all(min(h, w) >= 2 for h, w in hw):
                opts.append("multiscale")
            return opts
        intra = prefix[2]
        if depth == 3:
            if not feats or "channel" not in o.inter_transforms:
                return ["none"]
            lengths = [_positions(h, w, str(intra)) for h, w in hw]
            return ["none", "channel"] if all(n >= 2 for n in lengths) else ["none"]
        if depth == 4:
            raw = tuple(prefix[1:4]) == ("none", "none", "none")
            regs = [REGISTERED_PREFIX + n for n in self.registered.get(self._kind(inp), [])] if raw else []
            return list(o.distances) + regs
        dist = str(prefix[4])
        if depth == 5:
            soft = dist in SOFT_DISTANCES or (dist.startswith(REGISTERED_PREFIX)
                                              and takes_temperature(dist.removeprefix(REGISTERED_PREFIX)))
            return [float(t) for t in o.temperatures] if soft else [None]
        if depth == 6:
            return [float(a) for a in o.alphas]
        return []

    def signature(self) -> str:
        """A digest of everything that defines the space; a resumed study must match it."""
        blob = json.dumps({"inputs": self.inputs, "kinds": self.kinds, "registered": self.registered,
                           "levels": [self.opts.global_transforms, self.opts.intra_transforms,
                                      self.opts.inter_transforms, self.opts.distances, self.opts.temperatures,
                                      self.opts.alphas],
                           "shapes": {k: list(v) for k, v in sorted(self.student_shapes.items())}},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    # -- path -> terms ----------------------------------------------------------------------

    def candidate(self, path: tuple[Hashable, ...],
                  weights: dict[tuple[str, str], float] | None = None) -> Candidate:
        """Compile a complete path into distillation TermConfigs (one per teacher and layer).

        `weights[(teacher_id, input layer)]` are the training-free layer x teacher weights
        (default 1); the proxy later multiplies them by alpha and the per-term normaliser.
        """
        if len(path) != len(LEVELS):
            raise KdforgeError(f"autokd: a distiller path has {len(LEVELS)} decisions, got {list(path)}")
        inp, g, intra, inter, dist, temp, alpha = path
        layers = self.feature_layers if inp == MULTI else [str(inp)]
        terms = []
        for tid in self.teacher_shapes:
            for layer in layers:
                s_tap, t_tap = self.layers[layer]
                loss, args = self._loss(self.kinds[layer], str(g), str(intra), str(inter), str(dist), temp)
                kind = self.kinds[layer]
                conn = None if kind == "logits" else ("conv1x1" if kind == "features" else "linear")
                w = 1.0 if weights is None else float(weights.get((tid, layer), 1.0))
                name = f"autokd_{tid}_{layer}".replace(":", "_").replace(".", "_")
                terms.append(TermConfig(loss=loss, name=name, args=args, student=s_tap, teacher=t_tap,
                                        teacher_id=tid, connector=conn, weight=w, group="distill"))
        return Candidate(tuple(path), float(alpha), terms)

    def _loss(self, kind: str, g: str, intra: str, inter: str, dist: str,
              temp: Any) -> tuple[str, dict[str, Any]]:
        if dist.startswith(REGISTERED_PREFIX):
            name = dist.removeprefix(REGISTERED_PREFIX)
            return name, ({"temperature": float(temp)} if temp is not None else {})
        raw = (g, intra, inter) == ("none", "none", "none")
        if raw and dist == "kl" and kind == "logits" and "kd" in LOSSES:
            return "kd", {"temperature": float(temp)}
        if raw and dist == "mse" and kind != "logits" and "fitnet" in LOSSES:
            return "fitnet", {}
        args: dict[str, Any] = {"global_transform": g, "intra": intra, "inter": inter, "distance": dist}
        if temp is not None:
            args["temperature"] = float(temp)
        if g.startswith("mask"):
            args["mask_ratio"] = float(self.opts.mask_ratio)
        return "autokd_distill", args


def _positions(h: int, w: int, intra: str) -> int:
    if intra == "patches":
        return (h // 2) * (w // 2)
    if intra == "multiscale":
        return sum(k * k for k in SCALES if k <= min(h, w))
    return h * w
