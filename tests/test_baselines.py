import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from codec_det.baselines import (
    BaselineSettings,
    CPConv2d,
    SVDConv2d,
    Tucker2Conv2d,
    baseline_cost,
    baseline_layer_spec,
    baseline_max_rank,
    build_baseline_layer,
    check_method,
    compress_model_baseline,
    cp_als,
    decompose_baseline,
    layer_method,
    plan_baseline_compression,
    rank_for_macs,
    tucker2_hooi,
)
from codec_det.baselines.cp import cp_initial_terms, cp_prefix_errors
from codec_det.baselines.svd import svd_rank_errors
from codec_det.baselines.tucker2 import hosvd_rank_errors, tied_input_rank
from codec_det.checkpoint import load_compressed, save_compressed
from codec_det.complexity import count_model, record_conv_geometry
from codec_det.spec import CompressionSpec, SpecError
from codec_det.surgery import apply_spec, build_layer

TOOL = Path(__file__).resolve().parents[1] / "tools" / "compress_backbone.py"

@pytest.fixture(autouse=True)
def one_thread():
    # Small batched LAPACK calls ran 20x to 70x slower with two threads than
    # with one while other processes shared the two cores.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# (kernel, stride, padding, dilation, bias)
CONV_CASES = [
    (3, 1, 1, 1, True),
    (3, 2, 1, 1, False),
    (3, 1, 0, 1, True),
    (3, 1, 2, 2, False),
    ((3, 1), 1, (1, 0), 1, True),
    ((5, 3), (2, 1), (2, 1), 1, True),
    (3, 1, "same", 1, True),
    (3, 1, "valid", 1, False),
    (1, 1, 0, 1, True),
    (1, 2, 0, 1, False),
]
METHOD_RANKS = [("cp", 7), ("tucker2", 5), ("svd", 6)]


def make_conv(kernel, stride, padding, dilation, bias, in_channels=12, out_channels=10, seed=0):
    torch.manual_seed(seed)
    return nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, dilation=dilation,
                     bias=bias).double()


@pytest.mark.parametrize("method,rank", METHOD_RANKS)
@pytest.mark.parametrize("case", CONV_CASES)
def test_layer_matches_dense_reconstruction(method, rank, case):
    conv = make_conv(*case)
    layer, _ = decompose_baseline(conv, method, rank)
    images = torch.randn(2, 12, 11, 9, dtype=torch.float64)

    output = layer(images)
    dense_output = layer.to_dense()(images)

    assert output.shape == conv(images).shape
    assert (output - dense_output).abs().max().item() <= 1e-5


@pytest.mark.parametrize("method,rank", METHOD_RANKS)
def test_reported_error_is_reconstruction_error(method, rank):
    conv = make_conv(3, 1, 1, 1, True, in_channels=16, out_channels=20)
    layer, error = decompose_baseline(conv, method, rank)
    weight = conv.weight.detach()

    measured = float((layer.reconstruct_weight().detach() - weight).norm() / weight.norm())

    assert abs(measured - error) <= 1e-4
    assert 0 < error < 1


def test_layer_keeps_bias():
    conv = make_conv(3, 1, 1, 1, True)
    for method, rank in METHOD_RANKS:
        layer, _ = decompose_baseline(conv, method, rank)

        assert torch.equal(layer.bias.detach(), conv.bias.detach())


def test_layers_have_factor_parameters():
    cp = CPConv2d(8, 6, 3, rank=4)
    tucker = Tucker2Conv2d(8, 6, 3, input_rank=3, output_rank=2)
    svd = SVDConv2d(8, 6, 3, rank=5, bias=False)

    assert sorted(name for name, _ in cp.named_parameters()) == [
        "bias", "height_factors", "input_factors", "output_factors", "width_factors"]
    assert sorted(name for name, _ in tucker.named_parameters()) == ["bias", "core", "input_factors", "output_factors"]
    assert sorted(name for name, _ in svd.named_parameters()) == ["input_factors", "output_factors"]
    assert tuple(tucker.core.shape) == (2, 3, 3, 3)


def test_random_init_matches_dense_conv_scale():
    torch.manual_seed(0)
    dense_std = nn.Conv2d(64, 64, 3).weight.std().item()
    for layer in (CPConv2d(64, 64, 3, rank=32), Tucker2Conv2d(64, 64, 3, input_rank=32, output_rank=32),
                  SVDConv2d(64, 64, 3, rank=32)):
        std = layer.reconstruct_weight().std().item()

        assert 0.5 * dense_std < std < 2.0 * dense_std, type(layer).__name__


def test_svd_is_exact_at_full_rank():
    conv = make_conv(3, 1, 1, 1, False, in_channels=4, out_channels=6)
    _, error = decompose_baseline(conv, "svd", 6)

    assert error < 1e-12


def test_tucker2_recovers_low_multilinear_rank():
    torch.manual_seed(1)
    core = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    weight = torch.einsum("qrhw,nq,cr->nchw", core, torch.randn(9, 3, dtype=torch.float64),
                          torch.randn(7, 2, dtype=torch.float64))

    result = tucker2_hooi(weight, input_rank=2, output_rank=3)

    assert result.relative_error < 1e-8


def test_cp_recovers_low_cp_rank():
    torch.manual_seed(2)
    factors = [torch.randn(size, 4, dtype=torch.float64) for size in (10, 8, 3, 3)]
    weight = torch.einsum("nr,cr,hr,wr->nchw", *factors)

    result = cp_als(weight, 4, n_iter_max=200, tol=1e-12, ridge=1e-12, dtype=torch.float64)

    assert result.relative_error < 1e-3


def test_cp_als_lowers_the_starting_error():
    weight = torch.randn(16, 12, 3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    start = cp_prefix_errors(weight, cp_initial_terms(weight, 20), [20])[0]

    result = cp_als(weight, 20, n_iter_max=20, dtype=torch.float64)

    assert result.relative_error < start
    assert result.errors == sorted(result.errors, reverse=True)


def test_cp_als_matches_tensorly_parafac():
    from tensorly.decomposition import parafac

    weight = torch.randn(16, 12, 3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    _, tensorly_errors = parafac(weight.numpy(), 20, n_iter_max=30, init="svd", tol=0, return_errors=True)

    result = cp_als(weight, 20, n_iter_max=30, tol=0, dtype=torch.float64)

    assert result.relative_error <= float(tensorly_errors[-1]) + 0.01


def test_tucker2_matches_tensorly_partial_tucker():
    from tensorly.decomposition import partial_tucker

    weight = torch.randn(12, 10, 3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (core, factors), _ = partial_tucker(weight.numpy(), rank=[5, 4], modes=[0, 1], n_iter_max=50, tol=1e-10)
    rebuilt = np.einsum("qrhw,nq,cr->nchw", core, factors[0], factors[1])
    tensorly_error = np.linalg.norm(rebuilt - weight.numpy()) / np.linalg.norm(weight.numpy())

    result = tucker2_hooi(weight, input_rank=4, output_rank=5, n_iter_max=50, tol=1e-10)

    assert abs(result.relative_error - tensorly_error) < 1e-3


def test_cp_prefix_errors_match_reconstruction():
    weight = torch.randn(8, 6, 3, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    terms = cp_initial_terms(weight, 50)

    errors = cp_prefix_errors(weight, terms, [1, 10, 50])

    for rank, error in zip([1, 10, 50], errors):
        rebuilt = torch.einsum("nr,cr,hr,wr->nchw", *(factor[:, :rank] for factor in terms))
        assert abs(float((rebuilt - weight).norm() / weight.norm()) - error) < 1e-9
    assert errors == sorted(errors, reverse=True)


def test_cp_initial_terms_rebuild_kernel():
    weight = torch.randn(5, 4, 3, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    terms = cp_initial_terms(weight, 10_000)

    rebuilt = torch.einsum("nr,cr,hr,wr->nchw", *terms)

    assert torch.allclose(rebuilt, weight, atol=1e-10)


def test_hosvd_rank_errors_match_truncation():
    weight = torch.randn(9, 7, 3, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    result = tucker2_hooi(weight, input_rank=3, output_rank=4, n_iter_max=0)

    (error,) = hosvd_rank_errors(weight, [(3, 4)])

    assert abs(error - result.relative_error) < 1e-9


def test_svd_rank_errors_are_exact():
    conv = make_conv(3, 1, 1, 1, False)
    errors = svd_rank_errors(conv.weight, [2, 5])

    for rank, error in zip([2, 5], errors):
        _, measured = decompose_baseline(conv, "svd", rank)
        assert abs(measured - error) < 1e-9


def test_tied_input_rank_follows_channel_ratio():
    assert tied_input_rank(64, 128, 256) == 32
    assert tied_input_rank(1, 3, 512) == 1
    assert tied_input_rank(512, 64, 512) == 64


@pytest.mark.parametrize("method", ["cp", "tucker2", "svd"])
@pytest.mark.parametrize("case", [(3, 1, 1, 1, True), (3, 2, 1, 1, False), (1, 2, 0, 1, True), (3, 1, 0, 1, False)])
def test_cost_matches_fvcore(method, case):
    conv = make_conv(*case, in_channels=16, out_channels=24).float()
    model = nn.Sequential(nn.Conv2d(3, 16, 1), conv)
    geometry = record_conv_geometry(model, ["1"], (20, 18))["1"]
    layer_type = layer_method(method, conv.kernel_size)
    layer, _ = decompose_baseline(conv, layer_type, 5)
    dense_macs, dense_params = count_model(model, (20, 18))
    model[1] = layer

    macs, params = count_model(model, (20, 18))
    expected_macs, expected_params = baseline_cost(layer_type, geometry, 5)

    assert macs - (dense_macs - conv.weight.numel() * geometry.output_hw[0] * geometry.output_hw[1]) == expected_macs
    assert params - (dense_params - sum(p.numel() for p in conv.parameters())) == expected_params


def test_rank_for_macs_is_largest_fitting_rank():
    model = nn.Sequential(nn.Conv2d(3, 32, 1), nn.Conv2d(32, 64, 3, padding=1))
    geometry = record_conv_geometry(model, ["1"], (16, 16))["1"]
    for method in ("cp", "tucker2", "svd"):
        budget = 0.5 * 64 * 32 * 9 * 256

        rank = rank_for_macs(method, geometry, budget)

        assert baseline_cost(method, geometry, rank)[0] <= budget
        assert baseline_cost(method, geometry, rank + 1)[0] > budget
        assert rank <= baseline_max_rank(method, geometry)


def test_layer_method_uses_svd_for_pointwise():
    assert layer_method("cp", (1, 1)) == "svd"
    assert layer_method("tucker2", (1, 1)) == "svd"
    assert layer_method("cp", (3, 3)) == "cp"
    assert layer_method("svd", (3, 3)) == "svd"


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="unknown compression method 'tt'; choose one of codec, cp, tucker2, svd"):
        check_method("tt")
    with pytest.raises(ValueError, match="unknown baseline method 'codec'"):
        compress_model_baseline(nn.Sequential(nn.Conv2d(8, 8, 3)), "codec", target_macs=1e6)
    with pytest.raises(ValueError, match="unknown baseline layer type 'tt'"):
        decompose_baseline(make_conv(3, 1, 1, 1, True), "tt", 3)


@pytest.mark.parametrize("method,rank,message", [
    ("svd", 11, r"SVD rank 11 exceeds min\(N, C\*kh\*kw\) = 10"),
    ("tucker2", 11, "Tucker-2 output rank 11 exceeds the 10 filters"),
    ("cp", 0, "rank must be a positive integer, got 0"),
    ("svd", -2, "rank must be a positive integer, got -2"),
    ("tucker2", True, "rank must be a positive integer, got True"),
])
def test_rank_out_of_range_is_rejected(method, rank, message):
    conv = make_conv(3, 1, 1, 1, True)

    with pytest.raises(ValueError, match=message):
        decompose_baseline(conv, method, rank, name="block.conv")


def test_grouped_conv_is_rejected():
    conv = nn.Conv2d(8, 8, 3, groups=8)

    with pytest.raises(ValueError, match="groups=1"):
        decompose_baseline(conv, "cp", 2)


@pytest.mark.parametrize("method,rank", METHOD_RANKS)
def test_spec_round_trip_rebuilds_layer(method, rank):
    conv = make_conv(3, 2, 1, 1, True).float()
    layer, _ = decompose_baseline(conv, method, rank)
    entry = baseline_layer_spec(layer)
    spec = CompressionSpec(architecture="test", layers={"conv": entry})

    reread = CompressionSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    rebuilt = build_layer(reread.layers["conv"], "conv")
    rebuilt.load_state_dict(layer.state_dict())

    assert type(rebuilt) is type(layer)
    images = torch.randn(1, 12, 9, 9)
    assert torch.allclose(rebuilt(images), layer(images))


def test_spec_errors_name_the_layer():
    layer, _ = decompose_baseline(make_conv(3, 1, 1, 1, True).float(), "tucker2", 4)
    entry = baseline_layer_spec(layer)

    entry.extra = {}
    with pytest.raises(SpecError, match="layer block.conv: a tucker2 layer needs a positive integer extra.input_rank"):
        build_baseline_layer(entry, "block.conv")

    entry.extra = {"input_rank": 4}
    entry.layout = "pointwise+grouped"
    with pytest.raises(SpecError, match="layer block.conv: layout 'pointwise\\+grouped' does not match method"):
        build_baseline_layer(entry, "block.conv")


def small_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 48, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10),
    ).eval()


@pytest.mark.parametrize("method", ["cp", "tucker2", "svd"])
def test_saved_model_loads_back(tmp_path, method):
    model = small_cnn()
    reference = small_cnn(seed=1)
    result = compress_model_baseline(model, method, target_macs=0.6 * count_model(model, (32, 32))[0],
                                     input_size=(32, 32), rank_multiple=2, progress=False)
    save_compressed(result.model, result.spec, tmp_path)

    loaded = load_compressed(tmp_path, reference).eval()

    images = torch.randn(2, 3, 32, 32)
    assert torch.allclose(loaded(images), result.model(images), atol=1e-5)
    assert method in {entry.method for entry in result.spec.layers.values()}
    assert result.totals["macs_after"] <= 0.6 * result.totals["macs_before"]


def planned_macs(model, method, target, input_size):
    plan = plan_baseline_compression(model, method, target_macs=target, input_size=input_size)
    spec = CompressionSpec(architecture="test")
    for name, (layer_type, rank) in plan.items():
        if rank is None:
            continue
        conv = model.get_submodule(name)
        layer = build_baseline_layer_for(conv, layer_type, rank)
        spec.layers[name] = baseline_layer_spec(layer)
    apply_spec(model, spec)
    return count_model(model, input_size)[0]


def build_baseline_layer_for(conv, layer_type, rank):
    common = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None)
    if layer_type == "cp":
        return CPConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, rank=rank, **common)
    if layer_type == "tucker2":
        input_rank = tied_input_rank(rank, conv.in_channels, conv.out_channels)
        return Tucker2Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, input_rank=input_rank,
                             output_rank=rank, **common)
    return SVDConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, rank=rank, **common)


@pytest.mark.parametrize("method,fraction", [("cp", 0.55), ("tucker2", 0.34), ("svd", 0.45)])
def test_budget_met_on_resnet18(method, fraction):
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    total, _ = count_model(model, (112, 112))
    target = fraction * total

    macs = planned_macs(model, method, target, (112, 112))

    assert macs <= target
    assert macs >= 0.98 * target


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cp", "tucker2"])
@pytest.mark.parametrize("target", [2.25e9, 1.42e9])
def test_budget_met_on_resnet50(method, target):
    torch.manual_seed(0)
    model = torchvision.models.resnet50()

    macs = planned_macs(model, method, target, (224, 224))

    assert macs <= target
    assert macs >= 0.98 * target


@pytest.fixture
def compress_tool():
    spec = importlib.util.spec_from_file_location("compress_backbone_for_baselines", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["compress_backbone_for_baselines"] = module
    spec.loader.exec_module(module)
    return module


def test_tool_rejects_groups_with_baseline(compress_tool, tmp_path):
    args = compress_tool.parse_args(["--init", "random", "--target-macs", "2", "--method", "cp", "--groups", "4",
                                     "--output", str(tmp_path / "out")])

    with pytest.raises(SystemExit, match="--groups applies to --method codec only"):
        compress_tool.validate_args(args)


def test_tool_rejects_unknown_method(compress_tool, tmp_path, capsys):
    with pytest.raises(SystemExit):
        compress_tool.parse_args(["--init", "random", "--target-macs", "2", "--method", "tt",
                                  "--output", str(tmp_path / "out")])

    assert "invalid choice: 'tt'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cp", "tucker2", "svd"])
def test_tool_compresses_resnet50_with_baseline(compress_tool, tmp_path, method):
    output = tmp_path / method

    code = compress_tool.main(["--init", "random", "--method", method, "--target-macs", "2.25",
                               "--als-iterations", "2", "--output", str(output)])

    assert code == 0
    spec = CompressionSpec.load(output / "spec.json")
    assert spec.metadata["method"] == method
    assert abs(spec.metadata["macs_after"] / 2.25e9 - 1) <= 0.02
    reloaded = load_compressed(output, torchvision.models.resnet50())
    assert any(isinstance(module, (CPConv2d, Tucker2Conv2d, SVDConv2d)) for module in reloaded.modules())
