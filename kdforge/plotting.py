"""Figures written by runs, experiments and benchmarks: a headless pyplot and atomic PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdforge.train.checkpoint import atomic_write_bytes

__all__ = ["pyplot", "save_png"]


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: str | Path, dpi: int = 100) -> Path:
    """Render `fig` to PNG, write it atomically (temp file, then rename) and close the figure."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)
