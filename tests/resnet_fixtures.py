"""Shared test data for ResNet-50 models: a mixed compression plan and random norm statistics."""

import copy

import torch

from codec_det.checkpoint import save_compressed
from codec_det.compress import compress_model
from codec_det.decompose import ALSSettings

# Covers 3x3 and 1x1 convs, strided ones, shortcuts, several groups and
# permutations folded into the next norm and conv (G > 1 on foldable convs).
# Each entry is layer -> (groups, rank, cluster labels), as compress_model's plan takes it.
MIXED_PLAN = {
    "layer1.0.conv2": (2, 8, None),
    "layer1.0.downsample.0": (1, 32, None),
    "layer2.0.conv1": (2, 16, None),
    "layer2.0.conv2": (2, 16, None),
    "layer2.0.downsample.0": (1, 32, None),
    "layer3.1.conv1": (2, 32, None),
    "layer3.1.conv3": (1, 64, None),
    "layer4.0.conv1": (2, 32, None),
    "layer4.2.conv3": (1, 64, None),
}


def randomize_norms(model, seed=1):
    """Give every batch norm (torch's or Detectron2's frozen one) non-trivial statistics and affine terms."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "running_var", None) is None or getattr(module, "weight", None) is None:
                continue
            size = module.running_var.numel()
            module.weight.copy_(0.5 + torch.rand(size, generator=generator))
            module.bias.copy_(0.1 * torch.randn(size, generator=generator))
            module.running_mean.copy_(0.1 * torch.randn(size, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(size, generator=generator))
    return model


def save_mixed_compression(dense_model, directory):
    """Compress a copy of ``dense_model`` with ``MIXED_PLAN`` (3 ALS iterations) and save it into ``directory``."""
    result = compress_model(
        copy.deepcopy(dense_model),
        plan=MIXED_PLAN,
        input_size=(64, 64),
        settings=ALSSettings(n_iter_max=3),
        architecture="resnet50",
        progress=False,
    )
    save_compressed(result.model, result.spec, directory)
    return directory
