"""Optimizer parameter groups: per-group lr scale and weight decay, no decay on 1-d parameters, typo errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from kdforge.config import OptimConfig, ParamGroupConfig, load_config
from kdforge.errors import ConfigError
from kdforge.train.build import load_data
from kdforge.train.checkpoint import load_tensors
from kdforge.train.optim import build_optimizer, param_groups, set_lr
from kdforge.train.trainer import Trainer


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))


def _named(m: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return list(m.named_parameters())


def _by_param(groups: list[dict]) -> dict[int, dict]:
    return {id(p): g for g in groups for p in g["params"]}


def test_without_groups_the_optimizer_gets_the_plain_parameter_list() -> None:
    m = Tiny()
    out = param_groups(OptimConfig(), _named(m))
    assert [id(p) for p in out] == [id(p) for p in m.parameters()]


def test_no_decay_1d_exempts_biases_norm_scales_and_the_logit_scale() -> None:
    m = Tiny()
    groups = _by_param(param_groups(OptimConfig(weight_decay=0.1, no_decay_1d=True), _named(m)))
    assert groups[id(m.body.weight)]["weight_decay"] == 0.1
    for p in (m.body.bias, m.norm.weight, m.norm.bias, m.logit_scale):
        assert groups[id(p)]["weight_decay"] == 0.0


def test_first_matching_group_sets_lr_scale_and_decay_and_the_schedule_scales_every_group() -> None:
    m = Tiny()
    cfg = OptimConfig(name="adamw", lr=0.01, weight_decay=0.1, groups=[
        ParamGroupConfig(params=["logit_scale"], lr_scale=10.0, weight_decay=0.0),
        ParamGroupConfig(params=["*.bias", "logit_*"], lr_scale=0.5)])
    groups = _by_param(param_groups(cfg, _named(m)))
    assert groups[id(m.logit_scale)]["lr"] == pytest.approx(0.1) and groups[id(m.logit_scale)]["weight_decay"] == 0
    assert groups[id(m.body.bias)]["lr"] == pytest.approx(0.005) and groups[id(m.body.bias)]["weight_decay"] == 0.1
    assert groups[id(m.body.weight)]["lr"] == pytest.approx(0.01)
    opt = build_optimizer(cfg, param_groups(cfg, _named(m)))
    base = [g["lr"] for g in opt.param_groups]
    set_lr(opt, base, 0.5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([b * 0.5 for b in base])


def test_a_pattern_that_matches_nothing_is_one_line_naming_it() -> None:
    cfg = OptimConfig(groups=[ParamGroupConfig(params=["*logit_sacle"])])
    with pytest.raises(ConfigError, match=r"optim.groups.0.params: pattern '\*logit_sacle' matches no") as err:
        param_groups(cfg, _named(Tiny()))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("group", [ParamGroupConfig(params=[]), ParamGroupConfig(params=["*"], lr_scale=-1.0),
                                   ParamGroupConfig(params=["*"], weight_decay=-0.1)])
def test_bad_group_values_are_config_errors(group: ParamGroupConfig) -> None:
    with pytest.raises(ConfigError, match="optim.groups.0: needs params"):
        param_groups(OptimConfig(groups=[group]), _named(Tiny()))


def test_a_zero_lr_group_keeps_its_weights_through_the_trainer(tmp_path: Path) -> None:
    """Through the Trainer: a frozen-lr group (lr_scale 0) keeps its weights, the rest train."""
    data_arg = ("data.args={num_train: 32, num_test: 16, num_classes: 4, num_superclasses: 2, image_size: 8, "
                "cache: false}")
    common = [data_arg, "data.batch_size=16", "trainer.progress=false", "trainer.tensorboard=false",
              "student.name=convnet", "student.args={width: 4}", "trainer.epochs=1", "schedule.name=constant",
              "trainer.threads=1"]
    cfg = load_config(None, [*common, "optim.groups=[{params: ['student.fc.*'], lr_scale: 0.0, weight_decay: 0.0}]"])
    data = load_data(cfg.data, 0)
    trainer = Trainer(cfg, tmp_path / "grouped", data=data, quiet=True)
    init_state = {k: v.clone() for k, v in trainer.module.checkpoint_state().items()}
    trainer.fit()
    Trainer(load_config(None, common), tmp_path / "plain", data=data, quiet=True).fit()
    grouped = load_tensors(tmp_path / "grouped/checkpoints/last.safetensors")
    plain = load_tensors(tmp_path / "plain/checkpoints/last.safetensors")
    fc = [k for k in grouped if ".fc." in k]
    assert fc, list(grouped)[:5]
    for k in fc:
        assert torch.equal(grouped[k], init_state[k]), k            # lr 0: never moved
        assert not torch.equal(plain[k], init_state[k]), k          # it does train without the group
    body = [k for k in grouped if k not in fc and grouped[k].is_floating_point() and "running" not in k]
    assert any(not torch.equal(grouped[k], init_state[k]) for k in body)
