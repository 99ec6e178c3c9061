"""Writing and verifying every export artifact of a loaded model, into one output directory at once.

``export_subject`` writes, into a staging directory that becomes the output
only when every artifact passed its check (``atomic_output_dir``):

- ``backbone.safetensors`` and ``spec.json``: the weights in their training
  form and the structure needed to rebuild the model before loading them,
  plus ``fpn_spec.json`` for a backbone whose FPN has CoDeC convs;
- ``backbone.ts``: the model traced to TorchScript;
- ``backbone.onnx``: the model in ONNX with symbolic batch, height and width;
- ``detector.ts`` (Detectron2 subjects, on request): the whole R-CNN traced
  through ``TracingAdapter``;
- ``export_report.json``: every check, per artifact and input shape.

Each artifact is read back from its file and compared with the PyTorch model
in its training form at the traced input shape and at a second shape
(``codec_det.export.verify``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from codec_det.checkpoint import atomic_output_dir
from codec_det.export.deploy import to_deploy_form
from codec_det.export.detector import detector_adapter, trace_detector
from codec_det.export.onnx import DEFAULT_OPSET, OnnxRunner, check_onnx, export_onnx
from codec_det.export.sources import (
    CLASSIFIER,
    ExportSubject,
    rebuild_classifier,
    rebuild_detectron2_backbone,
)
from codec_det.export.torchscript import load_torchscript, save_torchscript, trace_module
from codec_det.export.verify import DEFAULT_TOLERANCE, ArtifactCheck, check_artifact, flatten_outputs

__all__ = [
    "WEIGHTS_FILE",
    "SPEC_FILE",
    "FPN_SPEC_FILE",
    "TORCHSCRIPT_FILE",
    "ONNX_FILE",
    "DETECTOR_FILE",
    "REPORT_FILE",
    "DEPLOY_FORMS",
    "ExportSettings",
    "ExportVerificationError",
    "export_subject",
]

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "backbone.safetensors"
SPEC_FILE = "spec.json"
# The same name as the FPN spec of tools/compress_backbone.py --from-d2 (codec_det.d2.config.FPN_SPEC_FILE).
FPN_SPEC_FILE = "fpn_spec.json"
TORCHSCRIPT_FILE = "backbone.ts"
ONNX_FILE = "backbone.onnx"
DETECTOR_FILE = "detector.ts"
REPORT_FILE = "export_report.json"

# "training": compressed layers as trained (stage-2 kernels rebuilt from the
# factors at each call, batch norms separate). "fast": ``to_deploy_form``.
DEPLOY_FORMS = ("training", "fast")

ERROR_METRIC = "max|artifact - pytorch| / max|pytorch| per output tensor, largest over the outputs"


@dataclass
class ExportSettings:
    """Settings of one export: the artifacts to make and the checks to run.

    Attributes:
        input_size: (H, W) of the traced input; the first check runs there at batch 1.
        second_size: (H, W) of the second check, run at batch 2 (one image for the detector).
        deploy_form: one of ``DEPLOY_FORMS``.
        full_detector: also trace the whole R-CNN (Detectron2 subjects).
        opset: ONNX opset, 17 or newer.
        tolerance: largest accepted ``max_rel_error``.
        seed: seed of the random check inputs.
    """

    input_size: tuple[int, int]
    second_size: tuple[int, int]
    deploy_form: str = "training"
    full_detector: bool = False
    opset: int = DEFAULT_OPSET
    tolerance: float = DEFAULT_TOLERANCE
    seed: int = 0


class ExportVerificationError(RuntimeError):
    """An artifact differs from the PyTorch model by more than the tolerance; ``report`` has every check."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


def _validate(subject: ExportSubject, settings: ExportSettings) -> None:
    if settings.deploy_form not in DEPLOY_FORMS:
        raise ValueError(f"deploy form {settings.deploy_form!r} is unknown; choose one of {', '.join(DEPLOY_FORMS)}")
    if settings.full_detector and subject.detector is None:
        raise ValueError(
            "--full-detector needs a Detectron2 model (--config-file and --weights); "
            "a classifier from --compressed has no detector to trace"
        )
    for label, (height, width) in (("input size", settings.input_size), ("second size", settings.second_size)):
        if min(height, width) < 32:
            raise ValueError(f"{label} {height}x{width} is too small; use at least 32x32")
        multiple = subject.size_multiple
        if height % multiple or width % multiple:
            raise ValueError(
                f"{label} {height}x{width}: the backbone needs a height and width divisible by {multiple} "
                f"(its size_divisibility); e.g. {height // multiple * multiple or multiple}x"
                f"{width // multiple * multiple or multiple}"
            )


def _check_inputs(settings: ExportSettings) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(settings.seed)
    return [
        torch.randn(1, 3, *settings.input_size, generator=generator),
        torch.randn(2, 3, *settings.second_size, generator=generator),
    ]


def _detector_inputs(settings: ExportSettings) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(settings.seed + 1)
    return [torch.rand(3, *size, generator=generator) * 255 for size in (settings.input_size, settings.second_size)]


def _expected(model: Callable, inputs: list[torch.Tensor]) -> list[list[tuple[str, torch.Tensor]]]:
    with torch.no_grad():
        return [flatten_outputs(model(tensor)) for tensor in inputs]


def _log_checks(checks: list[ArtifactCheck]) -> None:
    for check in checks:
        logger.info(
            "%s at %s: max_rel_error %.3g, %s",
            check.artifact,
            "x".join(map(str, check.input_shape)),
            check.max_rel_error,
            "pass" if check.passed else f"FAIL ({check.detail})",
        )


def _save_weights(subject: ExportSubject, directory: Path) -> None:
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in subject.model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "kind": subject.kind})
    # safetensors creates the file with mode 0600; give it the usual umask mode like the other artifacts.
    mask = os.umask(0)
    os.umask(mask)
    (directory / WEIGHTS_FILE).chmod(0o666 & ~mask)
    subject.spec.save(directory / SPEC_FILE)
    if subject.fpn_spec is not None:
        subject.fpn_spec.save(directory / FPN_SPEC_FILE)


def _rebuild(subject: ExportSubject, directory: Path) -> torch.nn.Module:
    state = load_file(str(directory / WEIGHTS_FILE))
    source = str(directory / WEIGHTS_FILE)
    if subject.kind == CLASSIFIER:
        from codec_det.spec import CompressionSpec

        return rebuild_classifier(CompressionSpec.load(directory / SPEC_FILE), state, source)
    fpn_spec_file = None if subject.fpn_spec is None else directory / FPN_SPEC_FILE
    return rebuild_detectron2_backbone(subject.cfg, directory / SPEC_FILE, state, source, fpn_spec_file)


def _versions() -> dict[str, str]:
    import codec_det

    versions = {"python": platform.python_version(), "torch": torch.__version__, "codec_det": codec_det.__version__}
    for name in ("onnx", "onnxruntime", "onnxscript", "detectron2"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        versions[name] = getattr(module, "__version__", "unknown")
    return versions


def _describe(subject: ExportSubject) -> str:
    if subject.kind == CLASSIFIER:
        return (
            "torchvision ResNet-50 classifier, whole network: images (B, 3, H, W), normalised with ImageNet "
            "mean and std, to logits (B, 1000)"
        )
    fpn = "" if subject.fpn_spec is None else f", {len(subject.fpn_spec.layers)} FPN convs compressed"
    return (
        f"Detectron2 R50-FPN backbone (bottom-up ResNet and FPN{fpn}): normalised images (B, 3, H, W), H and W "
        f"divisible by {subject.size_multiple}, to feature maps {', '.join(subject.output_names)}"
    )


def export_subject(
    subject: ExportSubject, output: str | os.PathLike, settings: ExportSettings, overwrite: bool = False
) -> dict[str, Any]:
    """Write and verify every artifact of ``subject`` into ``output``; returns the report.

    Artifacts are made and checked one after another, and the first one that
    fails a check stops the export.

    Raises:
        ValueError: an invalid setting (unknown deploy form, size not divisible,
            ``full_detector`` for a classifier); nothing is written.
        FileExistsError: ``output`` is not empty and ``overwrite`` is not set.
        ExportVerificationError: an artifact failed its check; ``output`` is
            left as it was and the error carries the report of the checks run.
    """
    _validate(subject, settings)
    reference = subject.model.eval()
    inputs = _check_inputs(settings)
    logger.info("running the PyTorch model at %s", ", ".join("x".join(map(str, t.shape)) for t in inputs))
    expected = _expected(reference, inputs)

    export_model = copy.deepcopy(reference)
    deploy_summary = None
    if settings.deploy_form == "fast":
        deploy_summary = to_deploy_form(export_model).summary()

    def weights_step(staging: Path) -> list[ArtifactCheck]:
        _save_weights(subject, staging)
        rebuilt = _rebuild(subject, staging)
        return check_artifact(WEIGHTS_FILE, rebuilt, inputs, expected, settings.tolerance)

    def torchscript_step(staging: Path) -> list[ArtifactCheck]:
        save_torchscript(trace_module(export_model, inputs[0]), staging / TORCHSCRIPT_FILE)
        traced = load_torchscript(staging / TORCHSCRIPT_FILE)
        return check_artifact(TORCHSCRIPT_FILE, traced, inputs, expected, settings.tolerance)

    def onnx_step(staging: Path) -> list[ArtifactCheck]:
        export_onnx(
            export_model,
            inputs[0],
            staging / ONNX_FILE,
            subject.output_names,
            opset=settings.opset,
            size_multiple=subject.size_multiple,
        )
        check_onnx(staging / ONNX_FILE)
        runner = OnnxRunner(staging / ONNX_FILE, threads=torch.get_num_threads())
        return check_artifact(ONNX_FILE, runner, inputs, expected, settings.tolerance)

    steps: list[tuple[str, Callable[[Path], list[ArtifactCheck]]]] = [
        (WEIGHTS_FILE, weights_step),
        (TORCHSCRIPT_FILE, torchscript_step),
        (ONNX_FILE, onnx_step),
    ]
    if settings.full_detector:
        steps.append((DETECTOR_FILE, lambda staging: _export_detector(subject, settings, staging)))

    report = {
        "kind": subject.kind,
        "model": _describe(subject),
        "source": subject.source,
        "compressed_layers": len(subject.spec.layers),
        "compressed_fpn_layers": 0 if subject.fpn_spec is None else len(subject.fpn_spec.layers),
        "deploy_form": settings.deploy_form,
        "deploy_changes": deploy_summary,
        "opset": settings.opset,
        "tolerance": settings.tolerance,
        "error_metric": ERROR_METRIC,
        "passed": False,
        "artifacts": {},
        "versions": _versions(),
    }
    with atomic_output_dir(output, overwrite=overwrite) as staging:
        for name, step in steps:
            start = time.perf_counter()
            checks = step(staging)
            _log_checks(checks)
            passed = all(check.passed for check in checks)
            report["artifacts"][name] = {
                "passed": passed,
                "seconds": round(time.perf_counter() - start, 2),
                "checks": [check.to_dict() for check in checks],
            }
            if not passed:
                failed = ", ".join(f"{name} at {'x'.join(map(str, c.input_shape))}" for c in checks if not c.passed)
                raise ExportVerificationError(f"check failed ({failed}); nothing was written to {output}", report)

        report["passed"] = True
        with open(staging / REPORT_FILE, "w") as stream:
            json.dump(report, stream, indent=1)
            stream.write("\n")
    logger.info("wrote %s", output)
    return report


def _export_detector(subject: ExportSubject, settings: ExportSettings, staging: Path) -> list[ArtifactCheck]:
    """Trace the whole R-CNN, write ``detector.ts`` and check it against ``TracingAdapter`` on the PyTorch model."""
    images = _detector_inputs(settings)
    reference = detector_adapter(subject.detector.eval(), images[0])
    expected = _expected(reference, images)

    detector = copy.deepcopy(subject.detector)
    if settings.deploy_form == "fast":
        to_deploy_form(detector)
    save_torchscript(trace_detector(detector, images[0]), staging / DETECTOR_FILE)
    traced = load_torchscript(staging / DETECTOR_FILE)
    return check_artifact(DETECTOR_FILE, traced, images, expected, settings.tolerance)
