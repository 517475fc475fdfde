"""How every method demo publishes its result: headline on stdout, JSON written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdforge.train.checkpoint import atomic_write_text

HEADLINE = ("baseline_metric", "method_metric", "delta", "direction_holds")


def publish(report: dict[str, Any], out: Path | None, full: bool = False) -> None:
    """Print the report (headline keys, or all with `full`); write it to `out` unless None (smoke runs)."""
    print(json.dumps(report if full else {k: report[k] for k in HEADLINE if k in report}, indent=2 if full else None))
    if out is None:
        return
    atomic_write_text(Path(out), json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} ({report.get('wall_time_s', 0):.0f}s)")
