"""Export of compressed (and original) backbones to TorchScript and ONNX, with verification.

- ``deploy``: ``to_deploy_form``, the fastest inference form of a model.
- ``torchscript``, ``onnx``, ``detector``: one artifact format each.
- ``verify``: comparison of an artifact's outputs with the PyTorch model's.
- ``sources``: strict loading of the classifier or the Detectron2 model.
- ``pipeline``: ``export_subject``, which writes and checks every artifact.
- ``timing``: latency measurement for ``tools/benchmark.py``.

Importing this package needs torch only; ONNX, ONNX Runtime and Detectron2
are imported where they are used.
"""

from codec_det.export.deploy import DeployReport, FusedCoDeCConv2d, fold_norm_into_conv, to_deploy_form
from codec_det.export.verify import DEFAULT_TOLERANCE, ArtifactCheck, relative_error

__all__ = [
    "DEFAULT_TOLERANCE",
    "ArtifactCheck",
    "DeployReport",
    "FusedCoDeCConv2d",
    "fold_norm_into_conv",
    "relative_error",
    "to_deploy_form",
]
