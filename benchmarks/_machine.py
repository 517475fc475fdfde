"""Helpers shared by the benchmark scripts: the machine description their results record."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def machine_description(device: torch.device, threads: int) -> list[str]:
    """CPU model, cores, load, torch version (and GPU), for the results file."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    lines = [f"CPU: {cpu}, {os.cpu_count()} logical cores; torch.set_num_threads({threads})",
             f"torch {torch.__version__}, Python {platform.python_version()}, {platform.system()} "
             f"{platform.release()}", f"device: {device}"]
    if device.type == "cuda":
        lines.append(f"GPU: {torch.cuda.get_device_name(device)}")
    if hasattr(os, "getloadavg"):
        lines.append("load average at start (1/5/15 min): " + " / ".join(f"{v:.2f}" for v in os.getloadavg()))
    return lines


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
