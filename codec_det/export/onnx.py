"""ONNX export with dynamic batch, height and width, and an ONNX Runtime runner.

Export uses torch's ``torch.export``-based ONNX exporter (the default of
``torch.onnx.export`` since torch 2.9; it needs the ``onnxscript`` package).
Batch, height and width are symbolic in the graph. Detectron2's FPN adds
upsampled coarse maps to finer ones, which only lines up when the image size
is a multiple of the backbone's ``size_divisibility`` (32 for R50-FPN), so
height and width are declared as multiples of ``size_multiple``.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["DEFAULT_OPSET", "INPUT_NAME", "NamedOutputs", "export_onnx", "check_onnx", "OnnxRunner"]

logger = logging.getLogger(__name__)

# Opset 18 is the lowest the torch 2.14 exporter emits without a version conversion pass.
DEFAULT_OPSET = 18
INPUT_NAME = "images"
# Upper bound of the symbolic batch size, height and width (torch.export needs finite ranges to reason about).
_MAX_BATCH = 1024
_MAX_SIDE = 8192


class NamedOutputs(nn.Module):
    """Wraps a model whose output is a tensor or a dict of tensors so that it returns a tuple in ``names`` order."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        super().__init__()
        self.model = model
        self.names = list(names)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        output = self.model(images)
        if isinstance(output, torch.Tensor):
            return (output,)
        return tuple(output[name] for name in self.names)


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike,
    output_names: Sequence[str],
    *,
    opset: int = DEFAULT_OPSET,
    size_multiple: int = 1,
    min_side: int = 32,
) -> None:
    """Export ``model`` (image batch in, tensor or dict of tensors out) to one self-contained ONNX file.

    Args:
        model: the model, in eval mode; its output is a tensor or a dict with ``output_names`` keys.
        example: an input batch (B, 3, H, W) at which the graph is exported.
        path: the ``.onnx`` file to write; weights are stored inside it.
        output_names: names of the graph outputs, in order.
        opset: the ONNX opset; at least 17.
        size_multiple: H and W are declared multiples of this (e.g. 32 for an FPN).
        min_side: the smallest H and W the graph accepts.
    """
    if opset < 17:
        raise ValueError(f"opset {opset} is too old; use 17 or newer")
    height, width = example.shape[-2:]
    if height % size_multiple or width % size_multiple:
        raise ValueError(
            f"example input {tuple(example.shape)}: height and width must be multiples of {size_multiple}"
        )

    batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
    if size_multiple > 1:
        low = max(1, -(-min_side // size_multiple))
        height_dim = size_multiple * torch.export.Dim("height_blocks", min=low, max=_MAX_SIDE // size_multiple)
        width_dim = size_multiple * torch.export.Dim("width_blocks", min=low, max=_MAX_SIDE // size_multiple)
    else:
        height_dim = torch.export.Dim("height", min=min_side, max=_MAX_SIDE)
        width_dim = torch.export.Dim("width", min=min_side, max=_MAX_SIDE)

    if any(not tensor.is_contiguous() for tensor in (*model.parameters(), *model.buffers())):
        # torch.export fails on channels_last weights with symbolic sizes ("Invalid ranges"); ONNX has no
        # memory format, so a contiguous copy exports the same graph.
        model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    wrapper = NamedOutputs(model, output_names).eval()
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (example,),
            os.fspath(path),
            dynamo=True,
            opset_version=opset,
            external_data=False,
            input_names=[INPUT_NAME],
            output_names=list(output_names),
            dynamic_shapes={"images": {0: batch, 2: height_dim, 3: width_dim}},
            verbose=False,
        )
    logger.info("wrote %s (opset %d)", path, opset)


def check_onnx(path: str | os.PathLike) -> Any:
    """Validate the file with ``onnx.checker`` and return the loaded ``onnx.ModelProto``."""
    import onnx

    model = onnx.load(os.fspath(path))
    onnx.checker.check_model(model, full_check=True)
    return model


class OnnxRunner:
    """An ONNX Runtime CPU (or CUDA) session that takes and returns torch tensors.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads; None leaves ONNX Runtime's default.
        device: ``"cpu"`` or ``"cuda"`` (needs the onnxruntime-gpu package).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, device: str = "cpu"):
        import onnxruntime as ort

        if not os.path.isfile(path):
            raise FileNotFoundError(f"ONNX file {path} not found")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if device == "cuda":
            # NOTE: this path has not been run: the machines it was written on have no GPU.
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError(
                    "ONNX Runtime has no CUDA execution provider here; install onnxruntime-gpu or run on the CPU"
                )
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(os.fspath(path), options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [output.name for output in self.session.get_outputs()]

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run on a (B, 3, H, W) batch; returns the outputs by name."""
        array = np.ascontiguousarray(images.detach().cpu().float().numpy())
        outputs = self.session.run(None, {self.input_name: array})
        return {name: torch.from_numpy(value) for name, value in zip(self.output_names, outputs)}
