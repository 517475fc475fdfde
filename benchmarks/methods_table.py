"""Collect results/methods/<id>.json into results/methods.md (and a bar plot results/methods.png).

Each JSON is written by `kdforge experiment configs/experiments/<id>.yaml`; see docs/extending.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kdforge.experiment.report import render_table  # noqa: E402
from kdforge.train.checkpoint import atomic_write_text  # noqa: E402


def load_rows(directory: Path) -> list[dict]:
    rows = []
    for path in sorted(directory.glob("*.json")):
        try:
            rows.append(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise SystemExit(f"methods_table: {path} is not valid JSON ({err})") from None
    return rows


def plot(rows: list[dict], path: Path) -> None:

    from kdforge.plotting import pyplot, save_png

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(rows)), 3.5))
    names = [r.get("id", r.get("method")) for r in rows]
    deltas = [r.get("mean_delta", r.get("delta", 0.0)) or 0.0 for r in rows]
    ax.bar(names, deltas, color=["tab:green" if d >= 0 else "tab:red" for d in deltas])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("method - baseline")
    ax.set_title("kdforge method demos (delta of each method's metric)")
    fig.tight_layout()
    save_png(fig, path, dpi=100)


def main() -> None:
    rows = load_rows(ROOT / "results" / "methods")
    atomic_write_text(ROOT / "results" / "methods.md", render_table(rows))
    if rows:
        plot(rows, ROOT / "results" / "methods.png")
    print(f"{len(rows)} methods -> results/methods.md")


if __name__ == "__main__":
    main()
