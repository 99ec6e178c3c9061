import copy

import pytest
import torch
import torchvision
from torch import nn

from codec_det.checkpoint import load_compressed, save_compressed
from codec_det.compress import compress_model
from codec_det.decompose import ALSSettings
from codec_det.spec import CompressionSpec, SpecError
from codec_det.surgery import apply_spec, compressible_convs, fold_permutations


def small_resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    # Non-trivial batch-norm statistics, so that a wrong permutation shows.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def test_skips_stem_and_grouped_convs(caplog):
    model = torchvision.models.mobilenet_v2()

    with caplog.at_level("INFO", logger="codec_det.surgery"):
        convs, skipped = compressible_convs(model)

    assert "features.0.0" in skipped
    assert "3-channel" in skipped["features.0.0"]
    assert "depthwise" in skipped["features.1.conv.0.0"]
    assert all(conv.groups == 1 for conv in convs.values())
    assert "features.1.conv.0.0 stays dense" in caplog.text


@pytest.fixture(scope="module")
def unfolded():
    """A ResNet-18 compressed with four groups per layer, permutations not yet folded."""
    return compress_model(
        small_resnet(), target_macs=1.2e9, groups=4, settings=ALSSettings(n_iter_max=2), fold=False, progress=False
    )


def test_folding_keeps_the_function(unfolded):
    model = copy.deepcopy(unfolded.model)
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(image)

    folded = fold_permutations(model)
    with torch.no_grad():
        after = model(image)

    assert folded
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-5)


def test_torchvision_cnn_reloads_from_spec(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.vgg11(num_classes=10).eval()
    result = compress_model(model, target_macs=4.0e9, settings=ALSSettings(n_iter_max=2), progress=False)
    save_compressed(result.model, result.spec, tmp_path)
    image = torch.randn(1, 3, 64, 64)

    reloaded = load_compressed(tmp_path, torchvision.models.vgg11(num_classes=10)).eval()

    with torch.no_grad():
        assert torch.equal(reloaded(image), result.model(image))


def test_spec_that_does_not_match_weights(unfolded, tmp_path):
    save_compressed(unfolded.model, unfolded.spec, tmp_path)
    spec = CompressionSpec.load(tmp_path / "spec.json")
    name = next(iter(spec.layers))
    spec.layers[name].rank += 8
    spec.save(tmp_path / "spec.json")

    with pytest.raises(SpecError, match=f"{name}.input_factors"):
        load_compressed(tmp_path, torchvision.models.resnet18(num_classes=10))


def test_spec_for_another_model(unfolded):
    with pytest.raises(SpecError, match="made for another model"):
        apply_spec(torchvision.models.resnet50(), unfolded.spec)


def test_spec_with_invalid_groups_rejected(tmp_path):
    data = {
        "format": "codec-det-spec",
        "version": 1,
        "architecture": "resnet18",
        "layers": {
            "layer1.0.conv1": {
                "method": "codec", "in_channels": 64, "out_channels": 64, "kernel_size": [3, 3],
                "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "bias": False,
                "groups": 5, "rank": 8, "permutation": list(range(64)),
            }
        },
    }

    with pytest.raises(SpecError, match="layer layer1.0.conv1: groups=5 does not divide out_channels=64"):
        CompressionSpec.from_dict(data)


def test_spec_from_a_newer_version_rejected():
    with pytest.raises(SpecError, match="spec version 99"):
        CompressionSpec.from_dict({"format": "codec-det-spec", "version": 99})
