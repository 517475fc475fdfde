"""Vision-language package: seeded pairs, the tokenizer, CLIP towers from transformers, metrics, `method: clip`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from kdforge.cli import main
from kdforge.errors import KdforgeError
from kdforge.methods.clip import load_or_build, save_model
from kdforge.tasks.vision_language import require_transformers
from kdforge.tasks.vision_language.data import COLOURS, SHAPES, class_prompts, make_pairs, vocabulary
from kdforge.tasks.vision_language.metrics import retrieval_recall, zero_shot_accuracy
from kdforge.tasks.vision_language.models import (
    ClipModelConfig,
    TowerSpec,
    encode_images,
    encode_texts,
    load_clip,
    pixels,
)
from kdforge.tasks.vision_language.tokenizer import build_tokenizer, encode, load_tokenizer

RECIPE = Path(__file__).resolve().parents[1] / "configs/vision_language/clip.yaml"
TINY = ["data.num_train=32", "data.num_val=16", "data.num_test=16", "train.epochs=2", "train.batch_size=8",
        "model.vision={layers: 1, width: 16, heads: 2, mlp: 32}",
        "model.text={layers: 1, width: 16, heads: 2, mlp: 32}",
        "model.projection_dim=8", "trainer.threads=1"]


def _tiny_model() -> ClipModelConfig:
    return ClipModelConfig(vision=TowerSpec(1, 16, 2, 32), text=TowerSpec(1, 16, 2, 32), projection_dim=8)


def test_pairs_are_seeded_and_captions_describe_the_image() -> None:
    a, b, c = make_pairs(40, seed=3), make_pairs(40, seed=3), make_pairs(40, seed=4)
    assert torch.equal(a.images, b.images) and a.captions == b.captions and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (40, 3, 32, 32) and a.images.dtype == torch.uint8
    for caption, label in zip(a.captions, a.labels.tolist()):
        words = caption.split()
        assert COLOURS[label // len(SHAPES)] in words and SHAPES[label % len(SHAPES)] in words
        assert set(words) <= set(vocabulary())
    names, prompts = class_prompts()
    assert len(prompts) == 25 and prompts[0] == "a red disc" and names[-1] == "purple ring"
    with pytest.raises(KdforgeError, match="need n >= 1"):
        make_pairs(0, seed=0)


def test_tokenizer_round_trip_and_reload(tmp_path: Path) -> None:
    tok = build_tokenizer(vocabulary(), context_length=16)
    ids, mask = encode(tok, ["a small red disc at the left", "a blue ring"], 16)
    assert ids.shape == (2, 16) and ids[0, 0].item() == 2 and ids[0, 8].item() == 3 and ids[1, 5:].eq(0).all()
    assert mask[1].tolist() == [1] * 5 + [0] * 11
    assert tok.decode(ids[0], skip_special_tokens=True) == "a small red disc at the left"
    assert encode(tok, ["a zebra"], 16)[0][0, 2].item() == 1          # unknown word -> <unk>
    tok.save_pretrained(str(tmp_path))
    again = load_tokenizer(tmp_path)
    assert torch.equal(encode(again, ["a small red disc at the left"], 16)[0], ids[:1])
    with pytest.raises(KdforgeError, match="holds no tokenizer"):
        load_tokenizer(tmp_path / "none")


def test_saved_model_reloads_with_from_pretrained(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vl = load_or_build(_tiny_model(), 32)
    save_model(vl.clip, vl.tokenizer, tmp_path / "m")
    again = load_or_build(ClipModelConfig(local_dir=str(tmp_path / "m")), 32)
    pairs = make_pairs(4, seed=1)
    ids, mask = encode(again.tokenizer, pairs.captions, 16)
    vl.clip.eval()
    with torch.no_grad():
        x = pixels(pairs.images)
        assert torch.allclose(encode_images(vl.clip, x), encode_images(again.clip, x))
        assert torch.allclose(encode_texts(vl.clip, ids, mask), encode_texts(again.clip, ids, mask))
    with pytest.raises(KdforgeError, match="takes 32 px images, the data are 48 px"):
        load_or_build(ClipModelConfig(local_dir=str(tmp_path / "m")), 48)


def test_zero_shot_and_recall_on_hand_made_similarities() -> None:
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    prompts = torch.tensor([[1.0, 0.1], [0.1, 1.0]])
    # image 2 lies exactly between: cos to prompt 0 and 1 tie -> argmax picks 0
    assert zero_shot_accuracy(img, prompts, torch.tensor([0, 1, 1])) == pytest.approx(200 / 3)
    sim = torch.tensor([[0.9, 0.1, 0.2],
                        [0.95, 0.5, 0.4],     # image 1: its caption is 2nd best
                        [0.3, 0.8, 0.1]])     # image 2: its caption is 3rd
    r = retrieval_recall(sim, ks=(1, 2))
    assert r["i2t_r1"] == pytest.approx(100 / 3) and r["i2t_r2"] == pytest.approx(200 / 3)
    # text 0: image 1 scores higher (0.95 > 0.9); text 1: image 2 (0.8 > 0.5); text 2: best is image 1 (0.4 > 0.1)
    assert r["t2i_r1"] == pytest.approx(0.0) and r["t2i_r2"] == pytest.approx(200 / 3)
    tie = retrieval_recall(torch.ones(3, 3), ks=(1,))        # identical captions tie with the true one: a hit
    assert tie["i2t_r1"] == 100.0


def test_missing_extra_and_local_dirs_fail_in_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(KdforgeError) as err:
        require_transformers()
    assert "pip install 'kdforge[vl]'" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.undo()
    with pytest.raises(KdforgeError, match="not a saved model directory") as err:
        load_clip(tmp_path / "missing")
    assert "\n" not in str(err.value)
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert/config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(KdforgeError, match="not a CLIP checkpoint"):
        load_clip(tmp_path / "bert")
    with pytest.raises(KdforgeError, match="not a saved model directory"):
        load_clip("openai/clip-vit-base-patch32")           # a hub name is never downloaded


def test_clip_recipe_trains_and_saves_a_reloadable_model(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", str(RECIPE), *TINY, "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    for key in ("test_zeroshot_top1", "test_i2t_r1", "test_i2t_r5", "test_t2i_r1", "test_t2i_r5", "params",
                "encode_ms_per_pair"):
        assert key in result
    assert result["steps"] == 8 and result["picture"] == "predictions.png" and (out / "predictions.png").is_file()
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert "train_clip" in header and "val_zeroshot_top1" in header
    assert load_clip(out / "model").config.vision_config.hidden_size == 16
    # a bad recipe field fails in one line and leaves no run behind
    capsys.readouterr()
    assert main(["train", str(RECIPE), *TINY, "model.patch_size=5", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "patch_size 5 does not divide" in err, err
    assert not (tmp_path / "bad").exists()


def test_stop_and_resume_is_bit_identical(tmp_path: Path) -> None:
    from recipe_checks import TIMING, run_dirs

    from kdforge.train.checkpoint import load_tensors
    from kdforge.train.stages import run_recipe

    over = [*TINY, "train.epochs=3", "trainer.progress=false"]
    full = run_recipe(RECIPE, over, out=tmp_path / "full")
    assert "stopped_at_step" in run_recipe(RECIPE, [*over, "trainer.stop_after_steps=6"], out=tmp_path / "cut")
    resumed = run_recipe(tmp_path / "cut/config.yaml", ["trainer.stop_after_steps=null"], out=tmp_path / "cut",
                         resume=True)
    for a, b in zip(run_dirs(tmp_path / "full"), run_dirs(tmp_path / "cut"), strict=True):
        wa, wb = (load_tensors(d / "checkpoints/last.safetensors") for d in (a, b))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    skip = TIMING | {"encode_ms_per_pair"}
    assert {k: v for k, v in full.items() if k not in skip} == {k: v for k, v in resumed.items() if k not in skip}
