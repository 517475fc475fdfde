"""Model zoo: exact parameter counts, output shapes, feature taps and registry errors.

The pinned counts were checked against the reference definitions (RepDistiller `models/`,
mdistiller `models/cifar` and `models/imagenet`) by loading the reference weights into
these models and comparing logits and every tapped feature.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdforge.errors import KdforgeError
from kdforge.models import adapt_reference_state_dict, create_model, list_models

# name -> (num_classes, exact parameter count)
PARAMS = {
    "resnet8": (100, 83_892),
    "resnet14": (100, 181_108),
    "resnet20": (100, 278_324),
    "resnet32": (100, 472_756),
    "resnet44": (100, 667_188),
    "resnet56": (100, 861_620),
    "resnet110": (100, 1_736_564),
    "resnet8x4": (100, 1_233_540),
    "resnet32x4": (100, 7_433_860),
    "wrn_16_1": (100, 180_916),
    "wrn_16_2": (100, 703_284),
    "wrn_40_1": (100, 569_780),
    "wrn_40_2": (100, 2_255_156),
    "vgg8": (100, 3_965_028),
    "vgg11": (100, 9_277_284),
    "vgg13": (100, 9_462_180),
    "vgg16": (100, 14_774_436),
    "vgg19": (100, 20_086_692),
    "mobilenetv2_x0_5": (100, 812_836),
    "shufflenetv1": (100, 949_258),
    "shufflenetv2": (100, 1_355_528),
    "resnet18_cifar": (100, 11_220_132),
    "resnet50_cifar": (100, 23_705_252),
    "resnet18": (1000, 11_689_512),
    "resnet34": (1000, 21_797_672),
    "resnet50": (1000, 25_557_032),
    "mobilenetv1": (1000, 4_231_976),
    "mlp": (100, 832_484),
    "convnet": (100, 106_372),
}

IMAGENET = {"resnet18", "resnet34", "resnet50", "mobilenetv1"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Batch-2 forwards are dominated by thread start-up/sync on small CPUs: use one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def input_size(name: str) -> int:
    return 64 if name in IMAGENET else 32


def run_with_taps(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward `x`, capturing every `feature_taps` entry with plain hooks."""
    feats: dict[str, torch.Tensor] = {}
    handles = []
    for key, path in model.feature_taps.items():
        module_path, _, kind = path.partition(":")
        module = model.get_submodule(module_path)
        if kind == "input":
            handles.append(module.register_forward_pre_hook(
                lambda _m, inp, key=key: feats.__setitem__(key, inp[0])))
        else:
            assert kind == "", path
            handles.append(module.register_forward_hook(
                lambda _m, _i, out, key=key: feats.__setitem__(key, out)))
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, feats


def test_every_model_is_pinned() -> None:
    assert sorted(PARAMS) == list_models()
    assert set(list_models("imagenet")) == IMAGENET
    assert set(list_models("small")) == {"mlp", "convnet"}
    assert len(list_models("cifar")) == 23


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_params_shape_and_taps(name: str) -> None:
    num_classes, expected = PARAMS[name]
    model = create_model(name, num_classes=num_classes).eval()
    assert n_params(model) == expected
    assert not any(getattr(m, "inplace", False) for m in model.modules()), "in-place op breaks hooks"
    assert isinstance(model.fc, nn.Linear) and model.feature_taps["pool"] == "fc:input"

    size = input_size(name)
    out, feats = run_with_taps(model, torch.randn(2, 3, size, size))
    assert isinstance(out, torch.Tensor) and out.shape == (2, num_classes)
    assert set(feats) == set(model.feature_taps)
    assert feats["pool"].shape == (2, model.fc.in_features)
    k = len(model.stage_channels)
    assert k >= 1 and all(f"feat{i}" in feats for i in range(1, k + 1))
    assert f"feat{k + 1}" not in feats
    for i, channels in enumerate(model.stage_channels, start=1):
        assert feats[f"feat{i}"].shape[:2] == (2, channels)
        if f"preact{i}" in feats:
            assert feats[f"preact{i}"].shape == feats[f"feat{i}"].shape
            assert feats[f"feat{i}"].min() >= 0 or name.startswith(("wrn", "mobilenetv2"))


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_single_channel_input(name: str) -> None:
    model = create_model(name, num_classes=10, in_channels=1).eval()
    size = input_size(name)
    with torch.no_grad():
        assert model(torch.randn(2, 1, size, size)).shape == (2, 10)


def test_preact_is_input_of_final_relu() -> None:
    model = create_model("resnet20").eval()
    assert model.feature_taps["preact3"] == "layer3.2.act_out:input"
    _, feats = run_with_taps(model, torch.randn(2, 3, 32, 32))
    assert feats["preact3"].min() < 0
    assert torch.equal(feats["feat3"], feats["preact3"].clamp(min=0))


def test_unknown_name_lists_close_matches() -> None:
    with pytest.raises(KdforgeError, match="close matches: .*resnet32x4"):
        create_model("resnet32x5")
    with pytest.raises(KdforgeError, match="unknown model"):
        create_model("totally-unknown-net")


def test_bad_kwargs_are_user_errors() -> None:
    with pytest.raises(KdforgeError, match="width"):
        create_model("resnet20", width=3)
    with pytest.raises(KdforgeError, match="num_classes"):
        create_model("resnet20", num_classes=0)


@pytest.mark.parametrize("size", [1, 5, 8, 28])
def test_convnet_any_input_size(size: int) -> None:
    model = create_model("convnet", num_classes=10, in_channels=1, width=8).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, size, size)).shape == (2, 10)


def test_convnet_width_and_depth() -> None:
    model = create_model("convnet", num_classes=10, in_channels=1, width=16, depth=4)
    assert model.stage_channels == [16, 32, 64, 64]
    with pytest.raises(KdforgeError, match="depth"):
        create_model("convnet", depth=5)


def test_mlp_input_features() -> None:
    model = create_model("mlp", num_classes=10, in_channels=1, input_size=8, hidden=[32, 16]).eval()
    assert model.in_features == 64 and model.stage_channels == [32, 16]
    assert n_params(model) == 64 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
        with pytest.raises(KdforgeError, match="64 input features"):
            model(torch.randn(2, 1, 28, 28))
    tabular = create_model("mlp", num_classes=3, in_features=4, hidden=[8])
    assert tabular(torch.randn(5, 4)).shape == (5, 3)


def test_adapt_reference_state_dict() -> None:
    model = create_model("vgg8", num_classes=10)
    reference = {k.replace("fc.", "classifier.", 1) if k.startswith("fc.") else k: v
                 for k, v in model.state_dict().items()}
    assert "classifier.weight" in reference
    ckpt = {"model": {f"module.{k}": v for k, v in reference.items()}, "epoch": 240}
    fresh = create_model("vgg8", num_classes=10)
    fresh.load_state_dict(adapt_reference_state_dict(fresh, ckpt), strict=True)
    assert torch.equal(fresh.fc.weight, model.fc.weight)

    r18 = create_model("resnet18_cifar", num_classes=10)
    keys = adapt_reference_state_dict(r18, {"layer2.0.shortcut.0.weight": 0, "linear.bias": 0})
    assert set(keys) == {"layer2.0.downsample.0.weight", "fc.bias"}
