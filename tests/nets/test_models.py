"""dd_bench.nets: the DD-specific architectures (PROTOCOL.md §1.1, §1.2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dd_bench.errors import ConfigError, UnknownNameError
from dd_bench.nets import MODELS, ConvNet, create_model, has_batchnorm, list_models

GREY_28 = (1, (28, 28))  # MNIST / FashionMNIST
RGB_32 = (3, (32, 32))  # CIFAR / SVHN


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("num_classes", "expected"), [(10, 320_010), (100, 504_420)])
def test_convnet_parameter_count_matches_protocol(num_classes: int, expected: int) -> None:
    assert n_params(create_model("ConvNet", 3, num_classes, (32, 32))) == expected


@pytest.mark.parametrize(("channels", "size"), [GREY_28, RGB_32])
def test_convnet_embeds_to_2048_for_28_grey_and_32_rgb(channels: int, size: tuple[int, int]) -> None:
    net = create_model("ConvNet", channels, 10, size)
    x = torch.randn(2, channels, *size)
    assert net.feature_dim == 2048
    assert net.embed(x).shape == (2, 2048)
    # The classifier is the only thing after embed: one Linear, no hidden FC.
    assert torch.allclose(net(x), net.classifier(net.embed(x)))


def test_28_grey_first_conv_pads_by_3() -> None:
    net = create_model("ConvNet", 1, 10, (28, 28))
    assert net.features[0].padding == (3, 3)
    assert create_model("ConvNet", 3, 10, (32, 32)).features[0].padding == (1, 1)


@pytest.mark.parametrize(("name", "size"), [("ConvNetD4", (64, 64)), ("ConvNetD5", (128, 128))])
def test_deeper_convnets_end_at_4x4_for_larger_images(name: str, size: tuple[int, int]) -> None:
    net = create_model(name, 3, 10, size)
    assert net.feature_dim == 2048
    assert net(torch.randn(1, 3, *size)).shape == (1, 10)


def test_instancenorm_is_groupnorm_one_group_per_channel() -> None:
    norms = [m for m in create_model("ConvNet", 3, 10, (32, 32)).modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 3
    for norm in norms:
        assert norm.num_groups == norm.num_channels == 128
        assert norm.affine
    for name in ("VGG11", "ResNet18", "ResNet18_AP"):
        model = create_model(name, 3, 10, (32, 32))
        group_norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
        assert group_norms and all(m.num_groups == m.num_channels for m in group_norms)
        assert not has_batchnorm(model)


@pytest.mark.parametrize(
    ("name", "norm_type"),
    [("ConvNetBN", nn.BatchNorm2d), ("ConvNetLN", nn.LayerNorm), ("ConvNetGN", nn.GroupNorm)],
)
def test_convnet_norm_variants(name: str, norm_type: type[nn.Module]) -> None:
    net = create_model(name, 3, 10, (32, 32))
    assert sum(isinstance(m, norm_type) for m in net.modules()) == 3
    if name == "ConvNetGN":
        assert all(m.num_groups == 4 for m in net.modules() if isinstance(m, nn.GroupNorm))


def test_has_batchnorm() -> None:
    for name in ("ConvNetBN", "ConvNetASwishBN", "AlexNetBN", "VGG11BN", "ResNet18BN", "ResNet18BN_AP"):
        assert has_batchnorm(create_model(name, 3, 10, (32, 32))), name
    for name in ("ConvNet", "ConvNetNN", "AlexNet", "MLP", "LeNet"):
        assert not has_batchnorm(create_model(name, 3, 10, (32, 32))), name


@pytest.mark.parametrize(("channels", "size"), [GREY_28, RGB_32], ids=["1x28x28", "3x32x32"])
@pytest.mark.parametrize("name", list_models())
def test_every_model_forward_and_embed_shapes(name: str, channels: int, size: tuple[int, int]) -> None:
    model = create_model(name, channels, 7, size)
    x = torch.randn(2, channels, *size)
    with torch.no_grad():
        assert model(x).shape == (2, 7)
        assert model.embed(x).shape == (2, model.feature_dim)


@pytest.mark.parametrize(("channels", "size", "dim"), [(*GREY_28, 512 * 3 * 3), (*RGB_32, 512 * 4 * 4)])
def test_resnet18_ap_classifier_size(channels: int, size: tuple[int, int], dim: int) -> None:
    for name in ("ResNet18_AP", "ResNet18BN_AP"):
        assert create_model(name, channels, 10, size).classifier.in_features == dim
    assert create_model("ResNet18", channels, 10, size).classifier.in_features == 512


def test_fixed_architecture_sizes() -> None:
    assert create_model("AlexNet", 1, 10, (28, 28)).classifier.in_features == 192 * 4 * 4
    assert create_model("AlexNet", 1, 10, (28, 28)).features[0].padding == (4, 4)
    assert create_model("VGG11", 3, 10, (32, 32)).classifier.in_features == 512
    assert create_model("MLP", 1, 10, (28, 28)).body[1].in_features == 784
    assert create_model("MLP", 3, 10, (32, 32)).body[1].in_features == 3072


def test_names_are_case_insensitive_with_aliases() -> None:
    for alias in ("convnet3", "ConvNetD3", "CONVNET", "resnet18bn_ap"):
        assert alias in MODELS
    assert MODELS.canonical("convnetd3") == "ConvNet"


def test_unknown_model_lists_available_names() -> None:
    with pytest.raises(UnknownNameError) as error:
        create_model("NoSuchNet", 3, 10, (32, 32))
    message = str(error.value)
    assert "NoSuchNet" in message
    assert "ConvNet" in message and "ResNet18BN_AP" in message


def test_overrides_apply_and_unknown_ones_are_named() -> None:
    net = create_model("ConvNet", 3, 10, (32, 32), width=32, act="sigmoid")
    assert isinstance(net, ConvNet) and net.width == 32 and net.act == "sigmoid"
    with pytest.raises(ConfigError, match="colour"):
        create_model("ConvNet", 3, 10, (32, 32), colour="red")
    with pytest.raises(ConfigError, match="width"):
        create_model("ResNet18", 3, 10, (32, 32), width=32)
    with pytest.raises(ConfigError, match="norm"):
        create_model("ConvNet", 3, 10, (32, 32), norm="weird")


def test_same_seed_same_init_and_no_reseeding() -> None:
    torch.manual_seed(0)
    first = create_model("ConvNet", 3, 10, (32, 32))
    second = create_model("ConvNet", 3, 10, (32, 32))
    torch.manual_seed(0)
    again = create_model("ConvNet", 3, 10, (32, 32))
    for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # Consecutive nets draw on from the RNG rather than reseeding: they differ.
    assert not torch.equal(first.features[0].weight, second.features[0].weight)


@pytest.mark.parametrize("name,channels,size", [("ConvNet", 1, 28), ("ConvNet", 3, 32), ("ConvNetMP", 1, 28),
                                                ("ConvNetD1", 3, 32), ("LeNet", 1, 28)])
def test_cpu_fast_path_equals_the_plain_modules_including_double_backward(name, channels, size):
    torch.manual_seed(0)
    net = create_model(name, channels, 10, (size, size)).double().train()
    x = torch.randn(6, channels, size, size, dtype=torch.double, requires_grad=True)
    y = torch.randint(0, 10, (6,))
    fast = net(x)
    plain = net.classifier(net.features(x).flatten(1)) if hasattr(net, "features") else net(x)
    torch.testing.assert_close(fast, plain)
    grads = []
    for out in (fast, plain):  # DC differentiates through parameter gradients (create_graph)
        g = torch.autograd.grad(torch.nn.functional.cross_entropy(out, y), list(net.parameters()), create_graph=True)
        grads.append(torch.autograd.grad(sum((p ** 2).sum() for p in g), x)[0])
    torch.testing.assert_close(grads[0], grads[1])


def test_avg_pool_2x2_matches_torch_including_odd_sizes():
    from dd_bench.nets.cpu_fast import avg_pool_2x2

    for shape in ((2, 3, 8, 8), (2, 3, 7, 9)):
        x = torch.randn(shape)
        torch.testing.assert_close(avg_pool_2x2(x), torch.nn.functional.avg_pool2d(x, 2))


def test_standard_layout_undoes_the_channels_last_strides_of_dsa_crop():
    from dd_bench.data.dsa import DSA
    from dd_bench.nets import standard_layout

    cropped = DSA("crop")(torch.randn(4, 1, 28, 28), generator=torch.Generator().manual_seed(0), siamese=True)
    fixed = standard_layout(cropped)
    assert fixed.stride() == (784, 784, 28, 1) and torch.equal(fixed, cropped)
    plain = torch.randn(4, 3, 8, 8)
    assert standard_layout(plain) is plain
