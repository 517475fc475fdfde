"""Run logging: metrics.csv (one row per evaluated epoch), TensorBoard scalars, progress bars."""

from __future__ import annotations

import csv
import io
import math
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from kdforge.train.checkpoint import atomic_write_text


def json_safe(value: Any) -> Any:
    """NaN/inf become null (JSON has no such numbers); containers are walked. Keeps every JSON file valid."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


class MetricsLog:
    """metrics.csv rewritten atomically each epoch, so it always matches the last checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []

    def load(self, upto_epoch: int) -> None:
        """On resume: keep rows of epochs already covered by the checkpoint."""
        if self.path.is_file():
            with self.path.open() as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= upto_epoch]

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())


class TensorBoard:
    """Scalars to TensorBoard when the package is installed; a no-op otherwise."""

    def __init__(self, log_dir: Path, enabled: bool) -> None:
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                return
            self.writer = SummaryWriter(str(log_dir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def progress(total: int, desc: str, enabled: bool, initial: int = 0) -> tqdm:
    """A tqdm bar on stderr (disabled when not wanted, e.g. non-zero DDP ranks)."""
    return tqdm(total=total, desc=desc, initial=initial, disable=not enabled, leave=False,
                dynamic_ncols=True, file=sys.stderr, mininterval=0.5)
