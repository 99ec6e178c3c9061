"""ResNet-50 at the codec-45 and codec-66 presets: budgets, spec round trip, folded permutations."""

import pytest
import torch
import torchvision

from codec_det.checkpoint import load_compressed, save_compressed
from codec_det.compress import compress_model
from codec_det.complexity import count_model
from codec_det.decompose import ALSSettings
from codec_det.layers.codec_conv import CoDeCConv2d
from codec_det.presets import get_preset

# Two ALS iterations: the budget and the structure do not depend on how far
# ALS converges, and the full solve is measured by the benchmark script.
FAST_ALS = ALSSettings(n_iter_max=2)


@pytest.fixture(scope="module", params=["codec-45", "codec-66"])
def compressed(request, tmp_path_factory):
    preset = get_preset(request.param)
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    result = compress_model(
        model,
        target_macs=preset.target_macs,
        target_params=preset.target_params,
        settings=FAST_ALS,
        architecture="resnet50",
        progress=False,
    )
    directory = tmp_path_factory.mktemp(request.param)
    save_compressed(result.model, result.spec, directory)
    return preset, result, directory


def test_budget_within_two_percent(compressed):
    preset, result, _ = compressed

    macs, params = count_model(result.model)

    assert macs == result.totals["macs_after"]
    assert abs(macs / preset.target_macs - 1) <= 0.02
    assert abs(params / preset.target_params - 1) <= 0.02


def test_spec_and_weights_reload_identically(compressed):
    _, result, directory = compressed
    image = torch.randn(2, 3, 224, 224)

    reloaded = load_compressed(directory, torchvision.models.resnet50()).eval()

    with torch.no_grad():
        assert torch.equal(reloaded(image), result.model(image))


def test_permutations_folded_inside_bottlenecks(compressed):
    _, result, _ = compressed
    layers = {name: module for name, module in result.model.named_modules() if isinstance(module, CoDeCConv2d)}

    grouped = [name for name, layer in layers.items() if layer.groups > 1]

    assert grouped
    for name in grouped:
        assert layers[name].permutation_folded, name
        assert name.endswith(("conv1", "conv2")), name


def test_report_rows_match_model(compressed):
    _, result, _ = compressed
    modules = dict(result.model.named_modules())

    for row in result.layers:
        module = modules[row.layer]
        if row.rank is None:
            assert type(module) is torch.nn.Conv2d
            assert row.macs_after == row.macs_before
        else:
            assert isinstance(module, CoDeCConv2d)
            assert module.rank == row.rank
            assert 0.0 <= row.rel_error <= 1.0
