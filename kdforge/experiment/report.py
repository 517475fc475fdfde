"""The experiment's results: one JSON schema for every method, a plot, and results/methods.md."""

from __future__ import annotations

import csv
import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any

from kdforge.experiment.recipe import ExperimentConfig
from kdforge.experiment.runner import Cell
from kdforge.experiment.stats import paired_summary
from kdforge.train.checkpoint import atomic_write_text
from kdforge.train.log import json_safe

__all__ = ["build_report", "plot_report", "render_table", "write_report"]


def _value(cell: Cell, key: str) -> float | None:
    """A result.json key, or `metrics.<column>` of the last metrics.csv row."""
    if key.startswith("metrics."):
        path = cell.out / "metrics.csv"
        if not path.is_file():
            return None
        with path.open() as f:
            rows = list(csv.DictReader(f))
        value = rows[-1].get(key[len("metrics."):]) if rows else None
        return float(value) if value not in (None, "") else None
    value = cell.result().get(key) if cell.done else None
    return float(value) if isinstance(value, int | float) else None


def _reference(ref: str | float, cfg: ExperimentConfig, stages: list[Cell], arms: list[Cell]) -> float | None:
    if not isinstance(ref, str):
        return float(ref)
    kind, name, key = ref.split(".", 2)
    cells = [c for c in (arms if kind == "arms" else stages) if c.name == name]
    values = [v for v in (_value(c, key) for c in cells) if v is not None]
    return statistics.fmean(values) if values else None


def _check(p: Any, cfg: ExperimentConfig, stages: list[Cell], arms: list[Cell]) -> dict[str, Any]:
    left, right = _reference(p.left, cfg, stages, arms), _reference(p.right, cfg, stages, arms)
    holds = None
    if left is not None and right is not None:
        holds = {">": left > right, "<": left < right, ">=": left >= right, "<=": left <= right}[p.op]
    return {"what": p.what, "check": f"{p.left} {p.op} {p.right}",
            "seen": f"{left if left is None else round(left, 4)} {p.op} {right if right is None else round(right, 4)}",
            "holds": holds}


def premise(cfg: ExperimentConfig, stages: list[Cell], arms: list[Cell]) -> dict[str, Any]:
    """What was checked, what was seen, and whether the effect the method exploits exists here."""
    checks = [_check(p, cfg, stages, arms) for p in cfg.all_premises()]
    if not checks:
        return {"what": "no premise check in the recipe", "seen": None, "holds": None}
    if len(checks) == 1:
        return checks[0]
    results = [c["holds"] for c in checks]
    holds = None if any(h is None for h in results) else all(results)
    return {"what": "; ".join(c["what"] for c in checks), "check": "; ".join(c["check"] for c in checks),
            "seen": "; ".join(c["seen"] for c in checks), "holds": holds, "checks": checks}


def build_report(cfg: ExperimentConfig, stages: list[Cell], arms: list[Cell], profile: str | None) -> dict[str, Any]:
    """The results JSON (the schema every method shares)."""
    by_arm: dict[str, dict[int, float]] = {a: {} for a in cfg.arms}
    wall = cpu = 0.0
    for cell in arms:
        value = _value(cell, cfg.metric)
        if value is not None and cell.seed is not None:
            by_arm[cell.name][cell.seed] = value
    for cell in [*stages, *arms]:
        if cell.done:
            wall += float(cell.result().get("wall_time_s") or 0.0)
            cpu += float(cell.result().get("cpu_time_s") or 0.0)
    summary = paired_summary(cfg.seeds, by_arm[cfg.baseline], by_arm[cfg.method], cfg.claimed_direction)
    arms_table = {}
    for arm, values in by_arm.items():
        vals = [values[s] for s in cfg.seeds if s in values]
        arms_table[arm] = {"values": vals, "seeds": [s for s in cfg.seeds if s in values],
                           "mean": statistics.fmean(vals) if vals else None,
                           "std": statistics.stdev(vals) if len(vals) > 1 else None}
    return {
        "id": cfg.id,
        "description": cfg.description,
        "metric": cfg.metric,
        "baseline": cfg.baseline,
        "method": cfg.method,
        **summary,
        "claimed_direction": cfg.claimed_direction,
        "paper_claim": cfg.paper_claim,
        "premise": premise(cfg, stages, arms),
        "arms": arms_table,
        "complete": all(c.done for c in [*stages, *arms]),
        "profile": profile or "cpu",
        "recipe": cfg.source,
        "notes": cfg.notes,
        "train_wall_time_s": round(wall, 1),
        "train_cpu_time_s": round(cpu, 1),     # this process's CPU time per run (not DataLoader workers)
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
    }


def write_report(report: dict[str, Any], path: Path) -> Path:
    """JSON (atomic) and a PNG of the per-seed metric and the paired deltas beside it."""
    atomic_write_text(path, json.dumps(json_safe(report), indent=2) + "\n")
    if report["paired_deltas"]:
        plot_report(report, path.with_suffix(".png"))
    return path


def plot_report(report: dict[str, Any], path: Path) -> None:
    from kdforge.plotting import pyplot, save_png

    plt = pyplot()

    seeds, base, meth = report["seeds"], report["baseline_values"], report["method_values"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.4), gridspec_kw={"width_ratios": [3, 2]})
    for s, b, m in zip(seeds, base, meth):
        ax1.plot([0, 1], [b, m], color="grey", lw=0.8)
        ax1.annotate(str(s), (1.02, m), fontsize=7, va="center")
    ax1.scatter([0] * len(base), base, label=report["baseline"], zorder=3)
    ax1.scatter([1] * len(meth), meth, label=report["method"], zorder=3)
    ax1.set_xticks([0, 1], [report["baseline"], report["method"]])
    ax1.set_xlim(-0.4, 1.4)
    ax1.set_ylabel(report["metric"])
    ax1.set_title("per seed (lines pair the seeds)", fontsize=9)
    deltas = report["paired_deltas"]
    ax2.scatter([0] * len(deltas), deltas, color="tab:purple", zorder=3)
    if report["ci95"]:
        low, high = report["ci95"]
        ax2.errorbar([0.3], [report["mean_delta"]], yerr=[[report["mean_delta"] - low], [high - report["mean_delta"]]],
                     fmt="o", color="black", capsize=4, label="mean, 95% CI")
    ax2.axhline(0, color="black", lw=0.8)
    ax2.set_xticks([])
    ax2.set_xlim(-0.4, 0.7)
    ax2.set_title(f"{report['method']} - {report['baseline']}: {report['verdict']}", fontsize=9)
    if report["ci95"]:
        ax2.legend(fontsize=7, loc="best")
    fig.suptitle(f"{report['id']} ({report['claimed_direction']} is the paper's claim)", fontsize=10)
    fig.tight_layout()
    save_png(fig, path, dpi=90)


def _fmt_arm(arm: dict[str, Any] | None) -> str:
    if not arm or arm.get("mean") is None:
        return ""
    return f"{arm['mean']:.2f} ± {arm['std'] or 0.0:.2f}"


def _fmt_old(stat: Any) -> str:
    return f"{stat['mean']:.2f} ± {stat.get('std', 0.0):.2f}" if isinstance(stat, dict) else ""


def render_table(rows: list[dict[str, Any]]) -> str:
    """results/methods.md from the JSONs: experiment reports (verdicts) and older demo reports."""
    lines = ["# Method evidence", "",
             "Each row: the method against the baseline its paper uses, same budget, paired seeds.",
             "Verdict: the 95% t-interval of the paired delta (method - baseline) lies on the paper's side of 0",
             "(`holds`), on the other side (`reversed`), or contains 0 (`inconclusive`). Premise: the",
             "recipe's check that the effect the method exploits exists at this scale. Each row's recipe:",
             "`configs/experiments/<method>.yaml`; per-seed values and what was tried:",
             "`results/methods/<method>.json`.",
             "Generated by `python benchmarks/methods_table.py` from `results/methods/*.json`.", "",
             "| method | metric | baseline arm | baseline (mean ± std) | method (mean ± std) | mean delta | 95% CI "
             "| seeds | premise | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in rows:
        if "verdict" in r:
            arms = r.get("arms", {})
            ci = r.get("ci95")
            prem = r.get("premise", {}).get("holds")
            lines.append(f"| {r['id']} | {r['metric']} | {r['baseline']} | {_fmt_arm(arms.get(r['baseline']))} | "
                         f"{_fmt_arm(arms.get(r['method']))} | "
                         f"{r['mean_delta']:+.2f} | {'' if not ci else f'[{ci[0]:+.2f}, {ci[1]:+.2f}]'} | "
                         f"{len(r['seeds'])} | {'yes' if prem else 'no' if prem is not None else 'n/a'} | "
                         f"**{r['verdict']}** |")
        else:
            lines.append(f"| {r['method']} | {r.get('metric', '')} | {r.get('baseline', '')} | "
                         f"{_fmt_old(r.get('baseline_metric'))} | {_fmt_old(r.get('method_metric'))} | "
                         f"{r.get('delta', 0.0):+.2f} |  | {len(r.get('seeds', []))} | n/a | (old demo) |")
        if r.get("notes"):
            notes.append(f"- **{r.get('id', r.get('method'))}**: {r['notes']}")
    if notes:
        lines += ["", "## Notes", "", *notes]
    return "\n".join(lines) + "\n"
