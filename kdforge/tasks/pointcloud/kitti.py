"""KITTI-style scenes of a user's own: `velodyne/*.bin`, `label_2/*.txt`, `calib/*.txt` under one root.

* `.bin`: float32 rows (x, y, z, intensity) in the lidar frame; a size that is not a whole number of
  16-byte rows fails in one line (a truncated file).
* label lines: `type truncated occluded alpha x1 y1 x2 y2 h w l x y z rotation_y [score]`, the box's
  bottom centre (x, y, z) in the rectified camera frame; a line with another field count or a
  non-number fails naming the file, the line and the field. Types outside the class list (Van,
  DontCare, ...) are skipped.
* calib: `P2` (3 x 4), `R0_rect` (3 x 3), `Tr_velo_to_cam` (3 x 4); a missing file or key fails in one line.

Boxes are converted into the lidar frame used everywhere in this package: (x, y, z centre, l, w, h,
yaw) with yaw = -rotation_y - pi/2. `write_kitti_frame` writes a scene back in the same format
(tests, and exporting procedural scenes for other tools).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kdforge.errors import KdforgeError
from kdforge.tasks.pointcloud.scenes import Scene
from kdforge.train.checkpoint import atomic_write_bytes, atomic_write_text

__all__ = ["KittiCalib", "LABEL_FIELDS", "load_bin", "load_calib", "load_kitti", "load_labels", "write_kitti_frame"]

LABEL_FIELDS = ["type", "truncated", "occluded", "alpha", "x1", "y1", "x2", "y2", "h", "w", "l", "x", "y", "z",
                "rotation_y"]


@dataclass
class KittiCalib:
    P2: Tensor          # (3, 4)
    R0: Tensor          # (3, 3)
    Tr: Tensor          # (3, 4) velodyne -> reference camera

    def rect_from_lidar(self) -> Tensor:
        """(4, 4) rectified-camera-from-lidar transform (R0_rect @ Tr_velo_to_cam)."""
        r0, tr = torch.eye(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64)
        r0[:3, :3], tr[:3, :] = self.R0.double(), self.Tr.double()
        return r0 @ tr

    def intrinsics(self) -> tuple[Tensor, Tensor]:
        """(K (3, 3), T (4, 4) camera-2-from-lidar), so that P2 @ rect_from_lidar == K @ T[:3]."""
        k = self.P2[:, :3].double()
        shift = torch.eye(4, dtype=torch.float64)
        shift[:3, 3] = torch.linalg.solve(k, self.P2[:, 3].double())
        return k, shift @ self.rect_from_lidar()


def load_bin(path: str | Path) -> Tensor:
    """(N, 4) float32 points of a KITTI `.bin` file."""
    path = Path(path)
    if not path.is_file():
        raise KdforgeError(f"point file {path} not found")
    size = path.stat().st_size
    if size % 16:
        raise KdforgeError(f"{path}: {size} bytes is not a whole number of float32 (x, y, z, intensity) points "
                           "(16 bytes each): the file is truncated or not a KITTI .bin")
    return torch.from_numpy(np.fromfile(path, dtype=np.float32).reshape(-1, 4).copy())


def load_calib(path: str | Path) -> KittiCalib:
    path = Path(path)
    if not path.is_file():
        raise KdforgeError(f"calibration file {path} not found (each frame needs calib/<frame>.txt)")
    rows: dict[str, list[float]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        key, _, rest = line.partition(":")
        try:
            rows[key.strip()] = [float(v) for v in rest.split()]
        except ValueError:
            raise KdforgeError(f"{path}:{n}: '{key.strip()}' holds a value that is not a number") from None
    need = {"P2": 12, "R0_rect": 9, "Tr_velo_to_cam": 12}
    for key, count in need.items():
        if key not in rows:
            raise KdforgeError(f"{path}: no '{key}' line (a KITTI calibration needs P2, R0_rect, Tr_velo_to_cam)")
        if len(rows[key]) != count:
            raise KdforgeError(f"{path}: '{key}' has {len(rows[key])} numbers, expected {count}")
    t = {k: torch.tensor(rows[k], dtype=torch.float64) for k in need}
    return KittiCalib(t["P2"].reshape(3, 4), t["R0_rect"].reshape(3, 3), t["Tr_velo_to_cam"].reshape(3, 4))


def load_labels(path: str | Path, calib: KittiCalib, class_names: list[str]) -> tuple[Tensor, Tensor]:
    """(boxes (M, 7) lidar frame, labels (M,)) of the label file's objects whose type is in `class_names`."""
    path = Path(path)
    if not path.is_file():
        raise KdforgeError(f"label file {path} not found")
    lookup = {c.lower(): i for i, c in enumerate(class_names)}
    lidar_from_rect = torch.linalg.inv(calib.rect_from_lidar())
    boxes, labels = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) not in (15, 16):
            raise KdforgeError(f"{path}:{n}: a label line has 15 fields (16 with a score), got {len(parts)}")
        values = {}
        for name, text in zip(LABEL_FIELDS[1:], parts[1:15], strict=True):
            try:
                values[name] = float(text)
            except ValueError:
                raise KdforgeError(f"{path}:{n}: field '{name}' is not a number: {text!r}") from None
        if parts[0].lower() not in lookup:      # DontCare rows carry -1 dimensions: checked only for our classes
            continue
        if values["h"] < 0 or values["w"] < 0 or values["l"] < 0:
            raise KdforgeError(f"{path}:{n}: negative box dimensions (h, w, l)")
        bottom = torch.tensor([values["x"], values["y"], values["z"], 1.0], dtype=torch.float64)
        x, y, z = (lidar_from_rect @ bottom)[:3].tolist()
        yaw = -values["rotation_y"] - math.pi / 2
        yaw = math.atan2(math.sin(yaw), math.cos(yaw))
        boxes.append([x, y, z + values["h"] / 2, values["l"], values["w"], values["h"], yaw])
        labels.append(lookup[parts[0].lower()])
    return (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 7), torch.tensor(labels, dtype=torch.long))


def load_kitti(root: str | Path, class_names: list[str], frames: list[str] | None = None) -> list[Scene]:
    """The frames (default: every `velodyne/*.bin`, sorted) of a KITTI-style folder as scenes.

    Point labels are unknown in KITTI's detection data: every point gets -1.
    """
    root = Path(root)
    if not (root / "velodyne").is_dir():
        raise KdforgeError(f"{root} is not a KITTI-style folder: no velodyne/ directory")
    if frames is None:
        frames = sorted(p.stem for p in (root / "velodyne").glob("*.bin"))
    if not frames:
        raise KdforgeError(f"{root / 'velodyne'} holds no .bin point file")
    scenes = []
    for frame in frames:
        points = load_bin(root / "velodyne" / f"{frame}.bin")
        calib = load_calib(root / "calib" / f"{frame}.txt")
        boxes, labels = load_labels(root / "label_2" / f"{frame}.txt", calib, class_names)
        scenes.append(Scene(points, torch.full((len(points),), -1, dtype=torch.long), boxes, labels))
    return scenes


def _fmt(values: Tensor | list[float]) -> str:
    return " ".join(f"{float(v):.12e}" for v in (values.flatten().tolist() if isinstance(values, Tensor) else values))


def write_kitti_frame(root: str | Path, frame: str, scene: Scene, calib: KittiCalib, class_names: list[str]) -> None:
    """Write `scene` as velodyne/<frame>.bin, label_2/<frame>.txt and calib/<frame>.txt under `root`."""
    root = Path(root)
    for sub in ("velodyne", "label_2", "calib"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(root / "velodyne" / f"{frame}.bin", scene.points.float().numpy().astype(np.float32).tobytes())
    atomic_write_text(root / "calib" / f"{frame}.txt",
                      f"P2: {_fmt(calib.P2)}\nR0_rect: {_fmt(calib.R0)}\nTr_velo_to_cam: {_fmt(calib.Tr)}\n")
    rect = calib.rect_from_lidar()
    lines = []
    for box, label in zip(scene.boxes.double(), scene.labels.tolist(), strict=True):
        x, y, z, l, w, h, yaw = box.tolist()
        cx, cy, cz = (rect @ torch.tensor([x, y, z - h / 2, 1.0], dtype=torch.float64))[:3].tolist()
        ry = -yaw - math.pi / 2
        ry = math.atan2(math.sin(ry), math.cos(ry))
        name = class_names[label].capitalize()
        lines.append(f"{name} 0.00 0 0.00 0.00 0.00 0.00 0.00 {h:.12e} {w:.12e} {l:.12e} {cx:.12e} {cy:.12e} "
                     f"{cz:.12e} {ry:.12e}")
    atomic_write_text(root / "label_2" / f"{frame}.txt", "\n".join(lines) + ("\n" if lines else ""))
