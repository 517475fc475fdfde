"""Procedural scenes: one scene description, rendered into an image and every per-pixel ground truth.

A `Scene` is geometry, not pixels: a background plane (its depth a linear function of the image
position, receding towards the top), a light direction, fog and a list of `SceneObject`s, each a
solid of one of `KINDS` (its semantic class) with a centre, size, rotation, depth, relief and
albedo. `render(scene, size)` rasterises it with a depth buffer into:

* `image`     uint8 (3, H, W): albedo x Lambert shading (ambient + diffuse), fog growing with depth
              (a monocular depth cue), a smooth texture and pixel noise;
* `semseg`    int64 (H, W): 0 background, k = 1..K for the visible object of kind KINDS[k - 1];
* `depth`     float (H, W): distance along the view axis (image side = 1 unit);
* `normals`   float (3, H, W): unit surface normals (x right, y down, z towards the camera);
* `boundary`  uint8 (H, W): 1 where a 4-neighbour shows another object (or the background);
* `instance`  int64 (H, W): 0 background, i + 1 for `scene.objects[i]`.

Because the description is renderer-independent (positions in [0, 1] image units, depths in the
same units), other renderers can read the same scenes: an echo simulator can use the object
depths and sizes, a compositor the instance map, a ViT the patch-level labels.
Everything is a pure function of the seed (`sample_scenes`). `procedural_split` renders a split
as `DenseData` (uint8 images + the targets of the requested tasks + the scene descriptions).
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.errors import KdforgeError
from kdforge.tasks.base import seeded_generator

__all__ = ["IGNORE", "KINDS", "RENDERED", "TASKS", "DenseData", "Scene", "SceneObject", "boundaries",
           "procedural_split", "render", "render_all", "sample_scene", "sample_scenes"]

KINDS = ("sphere", "box", "pyramid", "cylinder", "cone")      # semantic class k = 1 + KINDS.index(kind)
HUES = (0.0, 0.2, 0.4, 0.6, 0.8)                               # each kind's base hue (jittered per object)
RENDERED = ("image", "semseg", "depth", "normals", "boundary", "instance")


@dataclass
class SceneObject:
    """One solid. Position and size are fractions of the image side; depth in the same unit."""

    kind: str                                  # one of KINDS
    center: tuple[float, float]                # (x, y) in [0, 1]
    size: float                                # half-extent (radius) of the footprint
    angle: float                               # rotation of the footprint, radians
    depth: float                               # distance of the object's nearest point from the camera
    relief: float                              # how far the surface recedes at its rim, x size
    color: tuple[float, float, float]          # albedo RGB in [0, 1]

    @property
    def label(self) -> int:
        return 1 + KINDS.index(self.kind)


@dataclass
class Scene:
    """Background plane depth(x, y) = floor[0] + floor[1] * (1 - y) + floor[2] * (x - 0.5)."""

    objects: list[SceneObject] = field(default_factory=list)
    floor: tuple[float, float, float] = (3.0, 1.5, 0.0)
    floor_color: tuple[float, float, float] = (0.5, 0.5, 0.5)
    light: tuple[float, float, float] = (0.3, -0.4, 0.87)       # unit vector towards the light
    fog: float = 0.25                                           # fog density per depth unit
    texture_seed: int = 0


def _grid(size: int) -> tuple[Tensor, Tensor]:
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y, x = torch.meshgrid(c, c, indexing="ij")
    return x, y


def _surface(obj: SceneObject, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(inside mask, height h in [0, 1] over the whole grid): depth = obj.depth + relief * size * (1 - h)."""
    dx, dy = (x - obj.center[0]) / obj.size, (y - obj.center[1]) / obj.size
    ca, sa = math.cos(obj.angle), math.sin(obj.angle)
    u, v = ca * dx + sa * dy, -sa * dx + ca * dy
    rho2 = u ** 2 + v ** 2
    if obj.kind == "sphere":
        return rho2 <= 1.0, (1.0 - rho2).clamp_min(1e-3).sqrt()
    if obj.kind == "cone":
        return rho2 <= 1.0, 1.0 - rho2.clamp_min(1e-6).sqrt()
    if obj.kind == "box":          # a flat face tilted about the footprint's v axis
        return (u.abs() <= 0.8) & (v.abs() <= 0.8), 0.6 + 0.4 * u / 0.8
    if obj.kind == "pyramid":
        return (u.abs() <= 0.85) & (v.abs() <= 0.85), 1.0 - torch.maximum(u.abs(), v.abs()) / 0.85
    if obj.kind == "cylinder":     # curved across u, straight along v
        return (u.abs() <= 1.0) & (v.abs() <= 0.55), (1.0 - u ** 2).clamp_min(1e-3).sqrt()
    raise KdforgeError(f"unknown scene object kind '{obj.kind}'; known: {', '.join(KINDS)}")


def _normals(z: Tensor, size: int) -> Tensor:
    """Unit normals (3, H, W) of a depth surface z(x, y) given on the grid (x, y in image units)."""
    dzdy, dzdx = torch.gradient(z, spacing=1.0 / size)
    n = torch.stack([dzdx, dzdy, torch.ones_like(z)])      # depth grows away from the camera
    return n / n.norm(dim=0, keepdim=True)


def _smooth_noise(g: torch.Generator, size: int, cells: int = 6) -> Tensor:
    coarse = torch.rand(1, 1, cells, cells, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0, 0]


def render(scene: Scene, size: int = 64, noise: float = 0.02) -> dict[str, Tensor]:
    """Rasterise `scene` at `size` x `size` into the image and its ground truths (see the module doc)."""
    if size < 8:
        raise KdforgeError(f"render: size must be >= 8, got {size}")
    x, y = _grid(size)
    a, b, c = scene.floor
    depth = a + b * (1.0 - y) + c * (x - 0.5)
    normals = _normals(depth, size)
    albedo = torch.tensor(scene.floor_color).view(3, 1, 1).expand(3, size, size).clone()
    semseg = torch.zeros(size, size, dtype=torch.long)
    instance = torch.zeros(size, size, dtype=torch.long)
    for i, obj in enumerate(scene.objects):
        inside, h = _surface(obj, x, y)
        z = obj.depth + obj.relief * obj.size * (1.0 - h)
        visible = inside & (z < depth)
        depth = torch.where(visible, z, depth)
        normals = torch.where(visible, _normals(z, size), normals)
        albedo = torch.where(visible, torch.tensor(obj.color).view(3, 1, 1), albedo)
        semseg[visible] = obj.label
        instance[visible] = i + 1
    g = seeded_generator(scene.texture_seed, 5)
    light = torch.tensor(scene.light)
    light = light / light.norm()
    shade = 0.35 + 0.65 * (normals * light.view(3, 1, 1)).sum(0).clamp_min(0.0)
    texture = 0.85 + 0.3 * _smooth_noise(g, size)
    fog = 1.0 - torch.exp(-scene.fog * (depth - depth.min()))
    rgb = albedo * shade * texture
    rgb = rgb * (1 - fog) + 0.75 * fog
    rgb = rgb + noise * torch.randn(3, size, size, generator=g)
    image = (rgb.clamp(0, 1) * 255).round().to(torch.uint8)
    return {"image": image, "semseg": semseg, "depth": depth, "normals": normals,
            "boundary": boundaries(instance), "instance": instance}


def boundaries(instance: Tensor) -> Tensor:
    """uint8 (H, W): 1 where a 4-neighbour belongs to another instance (both sides of an edge)."""
    edge = torch.zeros_like(instance, dtype=torch.bool)
    dv = instance[1:] != instance[:-1]
    dh = instance[:, 1:] != instance[:, :-1]
    edge[1:] |= dv
    edge[:-1] |= dv
    edge[:, 1:] |= dh
    edge[:, :-1] |= dh
    return edge.to(torch.uint8)


def _u(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def sample_scene(g: torch.Generator, min_objects: int = 1, max_objects: int = 4, texture_seed: int = 0,
                 hue_jitter: float = 0.08) -> Scene:
    """One random scene: 1..max objects of random kinds over a receding background plane."""
    n = int(torch.randint(min_objects, max_objects + 1, (), generator=g))
    objects = []
    for _ in range(n):
        kind = KINDS[int(torch.randint(len(KINDS), (), generator=g))]
        hue = (HUES[KINDS.index(kind)] + _u(g, -hue_jitter, hue_jitter)) % 1.0
        color = colorsys.hsv_to_rgb(hue, _u(g, 0.45, 0.9), _u(g, 0.6, 1.0))
        objects.append(SceneObject(kind=kind, center=(_u(g, 0.15, 0.85), _u(g, 0.15, 0.85)), size=_u(g, 0.1, 0.24),
                                   angle=_u(g, 0.0, math.pi), depth=_u(g, 1.0, 2.6), relief=_u(g, 0.6, 1.2),
                                   color=tuple(float(v) for v in color)))
    elevation = _u(g, 0.6, 0.95)
    azimuth = _u(g, 0.0, 2 * math.pi)
    horizontal = math.sqrt(1 - elevation ** 2)
    light = (horizontal * math.cos(azimuth), horizontal * math.sin(azimuth), elevation)
    grey = _u(g, 0.35, 0.6)
    return Scene(objects=objects, floor=(_u(g, 2.8, 3.4), _u(g, 0.8, 2.0), _u(g, -0.6, 0.6)),
                 floor_color=(grey, grey, grey * _u(g, 0.85, 1.1)), light=light, fog=_u(g, 0.15, 0.35),
                 texture_seed=texture_seed)


def sample_scenes(count: int, seed: int, min_objects: int = 1, max_objects: int = 4) -> list[Scene]:
    """`count` scenes, a pure function of `seed` (scene i's texture is seeded by (seed, i))."""
    if count < 1 or not 1 <= min_objects <= max_objects:
        raise KdforgeError(f"sample_scenes: need count >= 1 and 1 <= min_objects <= max_objects, got {count}, "
                           f"{min_objects}, {max_objects}")
    g = seeded_generator(seed, 41)
    return [sample_scene(g, min_objects, max_objects, texture_seed=seed * 100_003 + i) for i in range(count)]


def render_all(scenes: list[Scene], size: int = 64, noise: float = 0.02) -> dict[str, Tensor]:
    """Every rendered map of every scene, stacked along a new first dimension."""
    maps = [render(s, size, noise) for s in scenes]
    return {k: torch.stack([m[k] for m in maps]) for k in RENDERED}


TASKS = ("semseg", "depth", "normals", "boundary")     # the dense tasks a split can carry
IGNORE = 255                                          # semseg label of unlabelled pixels (user data)


@dataclass
class DenseData:
    """One split: uint8 images (N, 3, H, W) and per-task targets (each with the batch on dim 0).

    semseg int64 (N, H, W) in 0..num_classes-1 (IGNORE = unlabelled); depth float (N, H, W), 0 =
    no measurement; normals float (N, 3, H, W), zero vectors = no measurement; boundary uint8
    (N, H, W). `scenes`: the descriptions the split was rendered from (procedural data only).
    """

    images: Tensor
    targets: dict[str, Tensor]
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    scenes: list[Scene] | None = None
    names: list[str] | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def tasks(self) -> list[str]:
        return [t for t in TASKS if t in self.targets]

    def subset(self, index: Tensor) -> dict[str, Tensor]:
        return {k: v[index] for k, v in self.targets.items()}


def procedural_split(count: int, seed: int, size: int = 64, min_objects: int = 1, max_objects: int = 4,
                     noise: float = 0.02, tasks: tuple[str, ...] = TASKS) -> DenseData:
    """`count` procedural scenes rendered at `size` with the targets of `tasks`."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise KdforgeError(f"dense data: unknown task(s) {unknown or '(none given)'}; known: {', '.join(TASKS)}")
    scenes = sample_scenes(count, seed, min_objects, max_objects)
    maps = render_all(scenes, size, noise)
    return DenseData(maps["image"], {t: maps[t] for t in tasks}, len(KINDS) + 1, ["background", *KINDS], scenes)
