"""FRePo's ConvNet against ``Conv`` in yongchao97/FRePo lib/models/networks.py (PROTOCOL §1.1)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dd_bench.nets import create_model, has_batchnorm


def _layers(net: nn.Module) -> list[str]:
    return [type(m).__name__ for m in net.features]


@pytest.mark.parametrize("channels,size,padding", [(1, (28, 28), 3), (3, (32, 32), 1)])
def test_widths_double_and_features_are_512x4x4(channels, size, padding):
    torch.manual_seed(0)
    net = create_model("FRePoConvNet", channels, 10, size)
    convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [128, 256, 512]
    assert convs[0].padding == (padding, padding) and convs[1].padding == (1, 1)
    assert all(c.bias is not None for c in convs)
    assert net.feature_dim == 512 * 4 * 4
    x = torch.randn(2, channels, *size)
    assert net.embed(x).shape == (2, 8192) and net(x).shape == (2, 10)


def test_no_norm_net_is_the_evaluation_net_and_bn_sits_before_blocks_two_and_three():
    torch.manual_seed(0)
    plain = create_model("FRePoConvNet", 1, 10, (28, 28))
    assert not has_batchnorm(plain)
    assert _layers(plain) == ["Conv2d", "ReLU", "AvgPool2d"] * 3
    bn = create_model("FRePoConvNetBN", 1, 10, (28, 28))
    assert _layers(bn) == (["Conv2d", "ReLU", "AvgPool2d"] + ["BatchNorm2d", "Conv2d", "ReLU", "AvgPool2d"] * 2)
    norms = [m for m in bn.features if isinstance(m, nn.BatchNorm2d)]
    assert [n.num_features for n in norms] == [128, 256]


def test_batchnorm_running_stats_follow_flax_momentum_point_one():
    # Flax: ra = 0.1 * ra + 0.9 * batch, so one train-mode batch moves the running mean 90% of the way.
    torch.manual_seed(0)
    net = create_model("FRePoConvNetBN", 1, 10, (28, 28)).train()
    first_bn = next(m for m in net.features if isinstance(m, nn.BatchNorm2d))
    captured = {}
    first_bn.register_forward_pre_hook(lambda module, inputs: captured.setdefault("x", inputs[0].detach()))
    with torch.no_grad():
        net(torch.randn(16, 1, 28, 28))
    batch_mean = captured["x"].mean(dim=(0, 2, 3))
    torch.testing.assert_close(first_bn.running_mean, 0.9 * batch_mean)
    assert first_bn.eps == 1e-5


def test_weights_start_as_flax_lecun_normal_with_zero_biases():
    torch.manual_seed(0)
    net = create_model("FRePoConvNet", 3, 10, (32, 32))
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            std = module.weight.std().item()
            assert abs(std * math.sqrt(fan_in) - 1.0) < 0.05, (type(module).__name__, std * math.sqrt(fan_in))
            bound = 2 * math.sqrt(1.0 / fan_in) / 0.87962566103423978
            assert module.weight.abs().max().item() <= bound + 1e-6
            assert torch.count_nonzero(module.bias) == 0
