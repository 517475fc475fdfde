"""Checkpoints: safetensors weights + JSON trainer state (RNG states included), written atomically.

Layout inside a run directory::

    checkpoints/last.safetensors     student + connectors + loss state (never the teachers)
    checkpoints/last.optim.safetensors  optimizer tensors (momentum buffers ...)
    checkpoints/last.json            epoch/step counters, best metric, optimizer non-tensor
                                     state, python/numpy/torch RNG states
    checkpoints/last.task.safetensors  tensors of the task's own state (banks, pseudo-labels), if any
    checkpoints/best.safetensors     weights of the best evaluated epoch
"""

from __future__ import annotations

import base64
import functools
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from kdforge.errors import KdforgeError


@functools.cache
def _umask() -> int:
    """The process umask, read once (reading it means setting it: not something to do per file write)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ensure_writable_dir(path: str | Path, what: str = "output directory") -> Path:
    """Create `path` (and parents) and prove a file can be written there; one clear line if not."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".kdforge-write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise KdforgeError(f"cannot write the {what} {path}: {err.strerror or err}") from None
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, then rename over `path` (mode follows the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())     # mkstemp makes 0600 files; keep the user's usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors file written atomically (contiguous CPU copies; shared storage is split)."""
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(plain, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise KdforgeError(f"checkpoint not found: {path}")
    try:
        return load_file(str(path))
    except Exception as err:   # safetensors raises several types for damaged files
        raise KdforgeError(f"cannot read checkpoint {path}: {err}") from None


# -- nested state (optimizer) <-> tensors + JSON ----------------------------------------------


def split_state(obj: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by a reference; collect tensors by key."""
    if isinstance(obj, Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_key(k), split_state(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, list | tuple):
        return [split_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def join_state(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {_unkey(k): join_state(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [join_state(v, tensors) for v in obj]
    return obj


def _key(k: Any) -> Any:
    return {"int": k} if isinstance(k, int) else k


def _unkey(k: Any) -> Any:
    return k["int"] if isinstance(k, dict) else k


# -- RNG ----------------------------------------------------------------------------------------


def _b64(t: Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": repr(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import ast

    py = ast.literal_eval(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


# -- run checkpoints ----------------------------------------------------------------------------


def save_checkpoint(ckpt_dir: Path, tag: str, weights: dict[str, Tensor], trainer_state: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None = None,
                    scaler_state: dict[str, Any] | None = None,
                    task_state: dict[str, Any] | None = None) -> None:
    """Write `<tag>.safetensors` (+ optimizer tensors) first, the JSON state last.

    The JSON is the commit point: a crash mid-save leaves the previous JSON pointing at
    complete files (each file is itself replaced atomically).
    """
    save_tensors(ckpt_dir / f"{tag}.safetensors", weights, {"format": "kdforge"})
    state = dict(trainer_state)
    if optimizer is not None:
        opt_tensors: dict[str, Tensor] = {}
        state["optimizer"] = split_state(optimizer.state_dict(), "opt", opt_tensors)
        save_tensors(ckpt_dir / f"{tag}.optim.safetensors", opt_tensors)
    if scaler_state is not None:
        state["grad_scaler"] = split_state(scaler_state, "scaler", {})
    if task_state:
        task_tensors: dict[str, Tensor] = {}
        state["task"] = split_state(task_state, "task", task_tensors)
        save_tensors(ckpt_dir / f"{tag}.task.safetensors", task_tensors)
    state["rng"] = rng_state()
    atomic_write_text(ckpt_dir / f"{tag}.json", json.dumps(state, indent=1))


def load_checkpoint(ckpt_dir: Path, tag: str = "last", with_task: bool = False) -> tuple[Any, ...]:
    """(weights, trainer_state, optimizer_state_dict or None[, task_state when `with_task`])."""
    json_path = ckpt_dir / f"{tag}.json"
    if not json_path.is_file():
        raise KdforgeError(f"no '{tag}' checkpoint in {ckpt_dir} (missing {json_path.name})")
    try:
        state = json.loads(json_path.read_text())
    except json.JSONDecodeError as err:
        raise KdforgeError(f"checkpoint state {json_path} is not valid JSON ({err})") from None
    weights = load_tensors(ckpt_dir / f"{tag}.safetensors")
    optim_state = None
    if "optimizer" in state:
        opt_tensors = load_tensors(ckpt_dir / f"{tag}.optim.safetensors")
        optim_state = join_state(state.pop("optimizer"), opt_tensors)
    if not with_task:
        return weights, state, optim_state
    task_state: dict[str, Any] = {}
    if "task" in state:
        task_state = join_state(state.pop("task"), load_tensors(ckpt_dir / f"{tag}.task.safetensors"))
    return weights, state, optim_state, task_state
