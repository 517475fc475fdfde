"""A user's clips on disk (frames, 8-bit flow u / v frames, PCM WAV): sampling, scaling, errors, and a recipe run."""

from __future__ import annotations

import json
import math
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdforge.cli import main
from kdforge.errors import KdforgeError
from kdforge.tasks.video.folders import load_clip_folder, read_wav

RECIPE = Path(__file__).resolve().parents[1] / "configs/methods/mm_ego_kd.yaml"


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _wav(path: Path, samples: np.ndarray, rate: int = 8000, channels: int = 1) -> None:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((samples * 32767).astype("<i2").tobytes())


def _clip(root: Path, name: str, frames: int = 6, side: int = 20, red: int = 200, du: float = 5.0,
          freq: float = 1000.0) -> None:
    """A clip whose frame k has every pixel value 10 * k in green, `red` in red; flow u = du px, v = 0."""
    clip = root / name
    for k in range(frames):
        rgb = np.zeros((side, side, 3), np.uint8)
        rgb[..., 0], rgb[..., 1] = red, 10 * k
        _png(clip / "rgb" / f"frame_{k:04d}.png", rgb)
        u = round((du / 20 + 1) / 2 * 255)
        _png(clip / "flow" / "u" / f"frame_{k:04d}.png", np.full((side, side), u, np.uint8))
        _png(clip / "flow" / "v" / f"frame_{k:04d}.png", np.full((side, side), 128, np.uint8))
    t = np.arange(4000) / 8000
    _wav(clip / "audio.wav", 0.5 * np.sin(2 * math.pi * freq * t))


def _dataset(root: Path, clips_per_split: int = 6) -> None:
    for split in ("train", "val", "test"):
        lines = ["clip,verb,noun"]
        for i in range(clips_per_split):
            verb, noun = i % 2, (i // 2) % 2
            name = f"{split}_{i}"
            _clip(root, name, frames=3, side=8, red=60 + 150 * noun, du=-6.0 + 12.0 * verb, freq=500.0 + 1500.0 * noun)
            lines.append(f"{name},{verb},{noun}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")


def test_frames_flow_and_audio_are_sampled_and_scaled(tmp_path: Path) -> None:
    _clip(tmp_path, "a", frames=6, side=20, du=5.0)
    (tmp_path / "train.csv").write_text("clip,verb,noun\na,1,2\n")
    data = load_clip_folder(tmp_path, "train", verbs=2, nouns=3, frames=3, size=10, audio_bins=8, audio_steps=5)
    assert data.shapes() == {"rgb": (3, 3, 10, 10), "flow": (2, 3, 10, 10), "audio": (1, 8, 5)}
    assert data.labels.tolist() == [1 * 3 + 2] and data.num_classes == 6
    # segment centres of 6 frames in 3 segments: frames 1, 3, 5 -> green 10, 30, 50
    green = data.modalities["rgb"][0, 1, :, 0, 0] * 0.3 + 0.5
    assert green.tolist() == pytest.approx([10 / 255, 30 / 255, 50 / 255], abs=1e-4)
    # u = 5 px at 20 px wide -> 2.5 px at 10 px (8-bit rounding: within 20 / 255 px before scaling)
    assert data.modalities["flow"][0, 0].mean().item() == pytest.approx(2.5, abs=0.1)
    assert data.modalities["flow"][0, 1].abs().max().item() < 0.1
    audio = data.modalities["audio"][0, 0]
    assert audio.mean().item() == pytest.approx(0, abs=1e-5) and audio.std().item() == pytest.approx(1, abs=1e-4)
    # a 1 kHz tone at 8 kHz sampling sits at a quarter of the band: the second of four bin quarters is loudest
    assert int(audio.mean(1).argmax()) in (1, 2)
    only_rgb = load_clip_folder(tmp_path, "train", 2, 3, frames=3, size=10, modalities=["rgb"])
    assert set(only_rgb.modalities) == {"rgb"}


def test_wav_widths_and_channels(tmp_path: Path) -> None:
    path = tmp_path / "s.wav"
    stereo = np.stack([np.full(100, 0.5), np.full(100, -0.25)], 1).reshape(-1)
    _wav(path, stereo, channels=2)
    samples, rate = read_wav(path)
    assert rate == 8000 and samples.shape == (100,)
    assert samples.mean().item() == pytest.approx(0.125, abs=1e-3)        # the channels are averaged


def test_bad_clip_folders_fail_in_one_line(tmp_path: Path) -> None:
    _clip(tmp_path, "a", frames=3)
    cases = [("clip,verb\na,0\n", "needs the header clip,verb,noun"),
             ("clip,verb,noun\na,x,0\n", "must be integers"),
             ("clip,verb,noun\na,0,5\n", "outside 0..1 / 0..2"),
             ("clip,verb,noun\nmissing,0,0\n", "is not a folder"),
             ("clip,verb,noun\n", "lists no clips")]
    for text, message in cases:
        (tmp_path / "train.csv").write_text(text)
        with pytest.raises(KdforgeError, match=message):
            load_clip_folder(tmp_path, "train", verbs=2, nouns=3)
    with pytest.raises(KdforgeError, match="missing split file"):
        load_clip_folder(tmp_path, "val", verbs=2, nouns=3)
    (tmp_path / "train.csv").write_text("clip,verb,noun\na,0,0\n")
    (tmp_path / "a" / "flow" / "v" / "frame_0002.png").unlink()
    with pytest.raises(KdforgeError, match="3 u and 2 v frames"):
        load_clip_folder(tmp_path, "train", verbs=2, nouns=3)
    (tmp_path / "a" / "rgb" / "frame_0001.png").write_text("not an image")
    with pytest.raises(KdforgeError, match="cannot read .*frame_0001.png"):
        load_clip_folder(tmp_path, "train", verbs=2, nouns=3, modalities=["rgb"])
    (tmp_path / "a" / "audio.wav").write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(KdforgeError, match="cannot read .*audio.wav as PCM WAV"):
        load_clip_folder(tmp_path, "train", verbs=2, nouns=3, modalities=["audio"])
    with pytest.raises(KdforgeError, match="modalities must be"):
        load_clip_folder(tmp_path, "train", verbs=2, nouns=3, modalities=["depth"])


def test_mm_ego_kd_recipe_runs_on_a_clip_folder(tmp_path: Path, capsys) -> None:
    root = tmp_path / "clips"
    _dataset(root)
    tiny = ["data.format=folder", f"data.root={root}", "data.verbs=2", "data.nouns=2", "data.frames=2",
            "data.size=8", "data.audio_bins=6", "data.audio_steps=4", "teachers=[rgb, flow]", "teacher_model.width=2",
            "student.width=2", "teacher_train.epochs=1", "train.epochs=1", "teacher_train.batch_size=4",
            "train.batch_size=4", "data.holdout_fraction=0.34"]
    run = tmp_path / "run"
    assert main(["train", str(RECIPE), *tiny, "--out", str(run)]) == 0
    result = json.loads((run / "result.json").read_text())
    assert result["train_clips"] == 6 and 0 <= result["test_top1"] <= 100
    capsys.readouterr()
    assert main(["train", str(RECIPE), *tiny, "data.root=", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.root must name the clip folder" in err
    assert main(["train", str(RECIPE), *tiny, f"data.root={tmp_path}/nowhere", "--out", str(tmp_path / "bad2")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing split file" in err
    assert not (tmp_path / "bad2" / "config.yaml").exists()
