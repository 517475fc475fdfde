"""BOSS: the checkpoint pool and draws, trial configs and the self-distillation loss against direct
computations, and tiny real searches (BOSS with interruption + resume, the plain-BO baseline)."""

from __future__ import annotations

import random
from pathlib import Path

import optuna
import pytest
import torch

from kdforge.config import load_config
from kdforge.distill.terms import term_from_config
from kdforge.errors import ConfigError, KdforgeError
from kdforge.losses.base import LossContext
from kdforge.registry import METHODS
from kdforge.search.boss import (
    BO,
    BOSS,
    WARMUP,
    draw,
    pool,
    run_boss,
    sampler_seed,
    study_names,
    trial_config,
)
from kdforge.search.options import BOSSOptions, load_options
from kdforge.search.storage import complete_trials, open_study

DATA = ["data.name=procedural_cifar", "data.batch_size=32", "data.val_fraction=0.2",
        "data.args={num_train: 320, num_test: 64, num_classes: 10, num_superclasses: 5, image_size: 16}"]
COMMON = ["trainer.device=cpu", "trainer.progress=false", "trainer.tensorboard=false"]


def _cfg(**_: object):   # noqa: ANN202
    return load_config(None, [*DATA, *COMMON, "student.name=convnet", "student.args={width: 4, depth: 2}",
                              "trainer.epochs=1"])


# ------------------------------------------------------------------ pool and draws


def _study_with(scores: dict[int, float], tmp: Path, phase: str = WARMUP) -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    for number, score in scores.items():
        ckpt = tmp / f"{phase}{number}.safetensors"
        ckpt.write_bytes(b"x")
        study.add_trial(optuna.trial.create_trial(value=score, user_attrs={
            "score": score, "phase": phase, "checkpoint_path": str(ckpt), "n": number}))
    return study


def test_pool_ranks_by_validation_score_across_both_studies(tmp_path: Path) -> None:
    warm = _study_with({0: 30.0, 1: 50.0, 2: 40.0}, tmp_path, WARMUP)
    boss = _study_with({0: 45.0, 1: 50.0}, tmp_path, BOSS)
    ranked = pool({WARMUP: warm, BOSS: boss})
    # by score; the tie at 50 goes to the earlier phase (warm-up)
    assert [(t.user_attrs["phase"], t.user_attrs["n"]) for t in ranked] == [
        (WARMUP, 1), (BOSS, 1), (BOSS, 0), (WARMUP, 2), (WARMUP, 0)]
    Path(ranked[0].user_attrs["checkpoint_path"]).unlink()          # a missing checkpoint leaves the pool
    assert len(pool({WARMUP: warm, BOSS: boss})) == 4


def test_draw_is_seeded_by_position_and_distinct(tmp_path: Path) -> None:
    top = pool({WARMUP: _study_with({0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}, tmp_path)})[:3]
    init, teacher = draw(top, position=5, seed=2, pretrained=True)
    assert init is not teacher
    expected = random.Random(2 * 1_000_003 + 5).sample(top, 2)        # the documented seeding
    assert (init, teacher) == (expected[0], expected[1])
    assert draw(top, 5, 2, True) == (init, teacher)                   # same position -> same draw
    assert {t.number for t in top} == {1, 2, 3}                       # top-3 of 4
    none_init, only_teacher = draw(top, 5, 2, pretrained=False)
    assert none_init is None and only_teacher in top
    with pytest.raises(KdforgeError):
        draw(top[:1], 0, 0, pretrained=True)


def test_sampler_seeds_and_study_names() -> None:
    assert sampler_seed(3, WARMUP, 4) == sampler_seed(3, BO, 4)          # BO repeats BOSS's warm-up proposals
    assert sampler_seed(3, BOSS, 4) != sampler_seed(3, WARMUP, 4)
    assert sampler_seed(3, WARMUP, 5) != sampler_seed(3, WARMUP, 4)      # a resumed phase gets new proposals
    opts = BOSSOptions(study_name="s")
    assert study_names(opts) == {WARMUP: "s_warmup", BOSS: "s_boss"}
    opts.merge_studies = True
    assert study_names(opts) == {WARMUP: "s", BOSS: "s"}
    opts.mode = "bo"
    assert study_names(opts) == {BO: "s_bo"}


# ------------------------------------------------------------------ trial configs and the SD loss


def test_trial_configs() -> None:
    cfg = _cfg()
    hp = {"lr": 0.2, "weight_decay": 1e-4, "one_minus_momentum": 0.05, "batch_size": 77}
    warm = trial_config(cfg, BOSSOptions(epochs=3), hp, position=2)
    assert (warm.optim.lr, warm.optim.weight_decay, warm.optim.momentum) == (0.2, 1e-4, pytest.approx(0.95))
    assert warm.data.batch_size == 77 and warm.schedule.name == "cosine" and warm.trainer.epochs == 3
    assert warm.teacher is None and [t.loss for t in warm.terms] == ["ce"] and warm.student.checkpoint is None
    sd = trial_config(cfg, BOSSOptions(), {**hp, "alpha": 0.3}, 4, "init.safetensors", "teacher.safetensors")
    assert sd.student.checkpoint == "init.safetensors"
    assert (sd.teacher.name, sd.teacher.args, sd.teacher.checkpoint) == ("convnet", {"width": 4, "depth": 2},
                                                                          "teacher.safetensors")
    assert [(t.loss, t.weight, t.student, t.teacher) for t in sd.terms] == [
        ("ce", 0.3, "logits", None), ("fitnet", pytest.approx(0.7), "logits", "logits")]


def test_self_distillation_term_is_mse_on_raw_logits() -> None:
    cfg = trial_config(_cfg(), BOSSOptions(), {"lr": 0.1, "weight_decay": 1e-4, "one_minus_momentum": 0.1,
                                               "batch_size": 32, "alpha": 0.25}, 3, None, "t.safetensors")
    term = term_from_config(cfg.terms[1])
    s = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]])
    t = torch.tensor([[0.0, -1.0, 0.5], [2.0, 1.0, 1.0]])
    term.setup([tuple(s.shape)], [tuple(t.shape)], 2)
    # nn.MSELoss on logits (the official consistency loss): mean of squared differences = (1+1+0+4+4+0)/6
    expected = 0.75 * (10.0 / 6.0)
    assert float(term([s], [t], LossContext())) == pytest.approx(expected)


def test_options_file_and_validation(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("trainer: {epochs: 2}\n")
    (tmp_path / "run.search.yaml").write_text("trials: 9\nwarmup: 3\n")
    opts = load_options(BOSSOptions, config, ["top_k=3"])
    assert (opts.trials, opts.warmup, opts.top_k) == (9, 3, 3)
    with pytest.raises(ConfigError, match="warmup"):
        load_options(BOSSOptions, config, ["warmup=1"])
    with pytest.raises(ConfigError, match="unknown key 'topk'"):
        load_options(BOSSOptions, config, ["topk=3"])


# ------------------------------------------------------------------ tiny real searches


def _trials(out: Path, name: str) -> list[tuple[int, dict, float]]:
    study = open_study(name, f"sqlite:///{out / 'search.db'}")
    return [(t.number, dict(t.params), t.value) for t in complete_trials(study)]


def test_boss_interrupted_then_resumed(tmp_path: Path) -> None:
    cfg = _cfg()
    opts = BOSSOptions(trials=4, warmup=2, top_k=2, seed=1)
    out = tmp_path / "boss"

    def stop_after_three(study, trial):   # noqa: ANN001, ANN202
        if trial.user_attrs["position"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KdforgeError, match="interrupted"):
        run_boss(cfg, opts, out, quiet=True, callbacks=[stop_after_three])
    warm_before, boss_before = _trials(out, "boss_warmup"), _trials(out, "boss_boss")
    assert (len(warm_before), len(boss_before)) == (2, 1)
    summary = run_boss(cfg, opts, out, quiet=True)
    warm_after, boss_after = _trials(out, "boss_warmup"), _trials(out, "boss_boss")
    assert warm_after == warm_before and boss_after[:1] == boss_before      # nothing finished was lost
    assert summary["trials_done"] == 4 and len(boss_after) == 2
    values = [v for *_, v in warm_after + boss_after]
    assert summary["best_value"] == pytest.approx(max(values))
    assert summary["best_so_far"] == [max(summary["best_so_far"][: i + 1]) for i in range(4)]
    assert summary["best_so_far"][-1] == pytest.approx(max(values))
    # BOSS trials: alpha proposed, student initialised from one warm-up checkpoint, taught by the other
    study = open_study("boss_boss", f"sqlite:///{out / 'search.db'}")
    for trial in complete_trials(study):
        assert "alpha" in trial.params
        run = load_config(Path(trial.user_attrs["run_dir"]) / "config.yaml")
        assert run.student.checkpoint != run.teacher.checkpoint
        assert {run.student.checkpoint, run.teacher.checkpoint} <= {
            str((out / "trials" / f"{p}/checkpoints/best.safetensors").resolve())
            for p in ("warmup_0000", "warmup_0001", "boss_0000")}
        assert [t.loss for t in run.terms] == ["ce", "fitnet"]
    assert load_config(summary["recipe"]).optim.lr == pytest.approx(summary["best_params"]["lr"])
    assert METHODS.meta("boss")["family"] == "search"


def test_plain_bo_baseline_proposes_like_the_warmup(tmp_path: Path) -> None:
    cfg = _cfg()
    boss_out, bo_out = tmp_path / "boss", tmp_path / "bo"
    run_boss(cfg, BOSSOptions(trials=3, warmup=2, top_k=2, seed=4), boss_out, quiet=True)
    summary = run_boss(cfg, BOSSOptions(trials=2, mode="bo", seed=4), bo_out, quiet=True)
    bo = _trials(bo_out, "boss_bo")
    assert len(bo) == 2 and all("alpha" not in p for _, p, _ in bo)
    assert [p for _, p, _ in bo[:2]] == [p for _, p, _ in _trials(boss_out, "boss_warmup")]
    for trial in complete_trials(open_study("boss_bo", f"sqlite:///{bo_out / 'search.db'}")):
        assert load_config(Path(trial.user_attrs["run_dir"]) / "config.yaml").teacher is None
    assert summary["kind"] == "bo" and summary["trials_done"] == 2


def test_boss_needs_a_validation_split(tmp_path: Path) -> None:
    cfg = load_config(None, [*DATA, *COMMON, "data.val_fraction=0.0"])
    with pytest.raises(KdforgeError, match="val_fraction"):
        run_boss(cfg, BOSSOptions(trials=3, warmup=2), tmp_path, quiet=True)


def test_search_command_reads_the_options_file_and_merged_studies(tmp_path: Path) -> None:
    from kdforge.search.cli import search_command

    config = tmp_path / "run.yaml"
    config.write_text("data: {name: procedural_cifar, batch_size: 32, val_fraction: 0.2, args: {num_train: "
                      "320, num_test: 64, num_classes: 10, num_superclasses: 5, image_size: 16}}\n"
                      "student: {name: convnet, args: {width: 4, depth: 2}}\n"
                      "trainer: {epochs: 1, device: cpu, progress: false, tensorboard: false}\n")
    (tmp_path / "run.search.yaml").write_text("trials: 9\nwarmup: 2\ntop_k: 2\nstudy_name: s\n")
    out = tmp_path / "out"
    overrides = ["search.merge_studies=true", "optim.lr=0.1"]
    summary = search_command("boss", str(config), overrides, None, 3, str(out))
    assert summary["trials_done"] == 3 and summary["studies"] == ["s"] and (out / "search.db").is_file()
    (boss_trial,) = [t for t in complete_trials(open_study("s", f"sqlite:///{out / 'search.db'}"))
                     if t.user_attrs["phase"] == BOSS]
    assert boss_trial.user_attrs["init_trial"] != boss_trial.user_attrs["teacher_trial"]
    drawn = {boss_trial.user_attrs["init_trial"], boss_trial.user_attrs["teacher_trial"]}
    assert drawn == {"warmup/0", "warmup/1"}
    with pytest.raises(KdforgeError, match="unknown search"):
        search_command("nas", str(config), [], None, 1, str(out))
    with pytest.raises(KdforgeError, match="database URL"):
        search_command("boss", str(config), [], "search.db", 3, str(out))


def test_missing_optuna_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from kdforge.search.storage import require_optuna

    monkeypatch.setitem(sys.modules, "optuna", None)      # makes `import optuna` raise ImportError
    with pytest.raises(KdforgeError, match=r"pip install 'kdforge\[search\]'"):
        require_optuna()
