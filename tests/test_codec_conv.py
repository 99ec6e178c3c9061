import pytest
import torch
from torch import nn

from codec_det.decompose import decompose_conv, max_rank
from codec_det.decomposition.coupled_cp import reconstruct_filters
from codec_det.layers.codec_conv import CoDeCConv2d

LAYER_CASES = [
    # kernel, stride, padding, dilation, bias
    (1, 1, 0, 1, False),
    (1, 2, 0, 1, True),
    (3, 1, 1, 1, True),
    (3, 2, 1, 1, False),
    (3, 1, 0, 1, False),
    (3, 1, "same", 1, True),
    (3, 1, 2, 2, False),
    (3, 1, "same", 2, True),
    (5, 1, 2, 1, True),
    (5, 2, 2, 1, False),
    (7, 2, 3, 1, False),
    ((3, 1), 1, (1, 0), 1, True),
    ((3, 1), 2, (1, 0), 1, False),
]


def relative_error(actual, expected):
    return float((actual - expected).detach().norm() / expected.detach().norm())


@pytest.mark.parametrize("kernel, stride, padding, dilation, bias", LAYER_CASES)
def test_layer_equals_dense_forms(kernel, stride, padding, dilation, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias)
    groups = 4
    layer, _ = decompose_conv(conv, groups=groups, rank=min(6, max_rank(conv, groups)))
    x = torch.randn(2, 16, 19, 23)

    output = layer(x)
    dense = layer.to_dense()
    reconstructed = nn.functional.conv2d(
        x, layer.reconstruct_weight(), dense.bias, conv.stride, conv.padding, conv.dilation
    )

    assert output.shape == conv(x).shape
    assert relative_error(output, dense(x)) <= 1e-5
    assert relative_error(output, reconstructed) <= 1e-5


@pytest.mark.parametrize("kernel, stride, padding, dilation, bias", LAYER_CASES)
def test_layer_equals_original_conv_at_exact_rank(kernel, stride, padding, dilation, bias):
    # Plant weights that are exactly rank R per group, so the decomposition is
    # exact and the layer must reproduce the original conv.
    torch.manual_seed(1)
    conv = nn.Conv2d(16, 32, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias).double()
    kh, kw = conv.kernel_size
    groups, rank = 2, 3
    labels = torch.arange(32) % groups
    planted = reconstruct_filters(
        torch.randn(groups, 16, rank, dtype=torch.float64),
        torch.randn(groups, 16, kh, rank, dtype=torch.float64),
        torch.randn(groups, 16, kw, rank, dtype=torch.float64),
    )
    order = torch.argsort(labels, stable=True)
    with torch.no_grad():
        conv.weight[order] = planted.reshape(32, 16, kh, kw)

    from codec_det.decompose import ALSSettings

    settings = ALSSettings(n_iter_max=3000, tol=1e-15, ridge=1e-12, dtype=torch.float64)
    layer, error = decompose_conv(conv, groups=groups, rank=rank, settings=settings, labels=labels)
    x = torch.randn(2, 16, 19, 23, dtype=torch.float64)

    assert error <= 1e-6
    assert relative_error(layer(x), conv(x)) <= 1e-5


def test_factors_are_the_parameters():
    layer = CoDeCConv2d(64, 128, 3, groups=4, rank=16, padding=1, bias=True)

    names = {name for name, _ in layer.named_parameters()}
    count = sum(parameter.numel() for parameter in layer.parameters())

    assert names == {"input_factors", "height_factors", "width_factors", "bias"}
    assert count == 4 * 16 * 64 + 128 * 16 * (3 + 3) + 128


def test_gradients_reach_factors():
    layer = CoDeCConv2d(8, 16, 3, groups=2, rank=4, padding=1, permutation=torch.randperm(16))

    layer(torch.randn(1, 8, 10, 10)).square().mean().backward()

    for parameter in layer.factors():
        assert parameter.grad is not None
        assert torch.isfinite(parameter.grad).all()
        assert parameter.grad.abs().sum() > 0


def test_outputs_in_original_filter_order():
    torch.manual_seed(2)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    layer, _ = decompose_conv(conv, groups=4, rank=max_rank(conv, 4))
    x = torch.randn(1, 8, 9, 9)

    assert not torch.equal(layer.permutation, torch.arange(16))
    per_filter_error = (layer(x) - conv(x)).flatten(2).norm(dim=2) / conv(x).flatten(2).norm(dim=2)
    # Each output channel approximates its own filter, not a shuffled one.
    assert per_filter_error.max() < 0.9


def test_loaded_permutation_is_applied():
    torch.manual_seed(3)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    trained, _ = decompose_conv(conv, groups=4, rank=4)
    rebuilt = CoDeCConv2d(8, 16, 3, groups=4, rank=4, padding=1, bias=True)
    x = torch.randn(1, 8, 9, 9)

    rebuilt.load_state_dict(trained.state_dict())

    assert not torch.equal(rebuilt.permutation, torch.arange(16))
    assert torch.allclose(rebuilt(x), trained(x), atol=1e-6)


def test_groups_must_divide_filters():
    conv = nn.Conv2d(8, 12, 3)

    with pytest.raises(ValueError, match="groups=5 does not divide its 12 filters"):
        decompose_conv(conv, groups=5, rank=2, name="block.conv2")


@pytest.mark.parametrize("rank", [0, -1])
def test_non_positive_rank_names_layer(rank):
    conv = nn.Conv2d(8, 16, 3)

    with pytest.raises(ValueError, match=f"block.conv2: rank must be a positive integer, got {rank}"):
        decompose_conv(conv, groups=1, rank=rank, name="block.conv2")


def test_rank_above_limit_names_layer_and_limit():
    conv = nn.Conv2d(8, 16, 3)
    limit = max_rank(conv, 1)

    with pytest.raises(ValueError, match=f"block.conv2: rank {limit + 1} exceeds its limit {limit}"):
        decompose_conv(conv, groups=1, rank=limit + 1, name="block.conv2")


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_weight_names_layer(bad_value):
    conv = nn.Conv2d(8, 16, 3)
    with torch.no_grad():
        conv.weight[3, 2, 1, 1] = bad_value

    with pytest.raises(ValueError, match="block.conv2: weight contains NaN or Inf"):
        decompose_conv(conv, groups=1, rank=2, name="block.conv2")
