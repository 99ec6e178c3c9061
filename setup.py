"""Packaging of codec-det.

Detectron2 is not a dependency here: its authors do not publish it on the
package index, so ``bash tools/setup_env.sh`` installs it (from its source
repository, or from the ``sal-detectron2`` republication of its Python
sources). The same script pins torch 2.14.1 and torchvision 0.29.1 with a
constraints file, which is why torch is not pinned below.
"""

from setuptools import find_packages, setup

setup(
    name="codec-det",
    version="0.1.0",
    description=(
        "CoDeC (coupled filters decomposition) compression of ResNet-50 backbones "
        "for Detectron2 Faster, Mask and Keypoint R-CNN"
    ),
    python_requires=">=3.10",
    packages=find_packages(include=["codec_det", "codec_det.*"]),
    package_data={"": ["*.json"], "codec_det": ["specs/*.json"]},
    install_requires=[
        "torch",
        "torchvision",
        "tensorly",
        "numpy",
        "scipy",
        "fvcore",
        "safetensors",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout"],
        # torch.onnx.export (the torch.export-based exporter, default since torch 2.9) needs onnxscript.
        "export": ["onnx", "onnxruntime", "onnxscript"],
        # mmdet 3.3.0 also needs mmcv<2.2.0 at import. mmcv 2.1.0 is published only
        # as a source archive, which does not build as it is with torch 2.14, so
        # tools/build_mmcv_wheel.sh builds it and tools/setup_env.sh --with-mmdet
        # installs that wheel before this extra.
        "mmdet": ["mmengine==0.10.7", "mmdet==3.3.0"],
    },
)
