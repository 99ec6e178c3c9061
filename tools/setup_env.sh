#!/usr/bin/env bash
# Set up codec-det in one command: bash tools/setup_env.sh [--with-mmdet]
#
# Creates (or reuses) the virtual environment .venv in the repository root,
# installs torch 2.14.1 and torchvision 0.29.1, Detectron2, codec-det in
# editable mode with its test extras, and downloads the demo photos.
# Safe to re-run: finished steps are checked and skipped.
#
# --with-mmdet (or CODEC_WITH_MMDET=1) also installs MMDetection 3.3.0 with
# mmengine 0.10.7 and mmcv 2.1.0. The mmcv wheel comes from the cache of
# tools/build_mmcv_wheel.sh, which builds it first when the cache has none
# for this Python and torch (7 to 16 minutes on 2 cores, idle or busy).
#
# Environment variables:
#   CODEC_WITH_MMDET               1 to install MMDetection, as --with-mmdet does (default: 0)
#   CODEC_WHEEL_CACHE              folder of the cached mmcv wheels (default: ${XDG_CACHE_HOME:-$HOME/.cache}/codec-det/wheels)
#   PYTHON                         interpreter that creates the venv (default: python3; 3.10+)
#   CODEC_DEMO_DATA                demo data folder (default: datasets/codec_demo)
#   CODEC_UPSTREAM_PROBE_TIMEOUT   seconds to wait for Detectron2's source repository (default: 60)
#   CODEC_UPSTREAM_BUILD_TIMEOUT   seconds allowed to build Detectron2 from source (default: 1800)
set -Eeuo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
VENV_PYTHON="$VENV/bin/python"
PYTHON="${PYTHON:-python3}"

TORCH_VERSION="2.14.1"
TORCHVISION_VERSION="0.29.1"
DETECTRON2_GIT_URL="https://github.com/facebookresearch/detectron2.git"
SAL_DETECTRON2="sal-detectron2==0.7.2"
UPSTREAM_PROBE_TIMEOUT="${CODEC_UPSTREAM_PROBE_TIMEOUT:-60}"
UPSTREAM_BUILD_TIMEOUT="${CODEC_UPSTREAM_BUILD_TIMEOUT:-1800}"
WITH_MMDET="${CODEC_WITH_MMDET:-0}"
MMCV_VERSION="2.1.0"
MMDET_VERSION="3.3.0"
# Records which route installed Detectron2, so that re-runs can report it.
DETECTRON2_ROUTE_FILE="$VENV/codec-det-detectron2-route.txt"

# Detectron2's runtime dependencies. Its package metadata also pins numpy<2,
# which it does not need. It imports pkg_resources, which setuptools 81
# removed.
DETECTRON2_DEPENDENCIES=(
    fvcore iopath pycocotools "omegaconf<2.4" hydra-core yacs termcolor tabulate
    cloudpickle tqdm matplotlib tensorboard shapely scipy "setuptools<81"
)

for argument in "$@"; do
    case "$argument" in
        --with-mmdet)
            WITH_MMDET=1
            ;;
        -h | --help)
            sed -n '2,/^set -Eeuo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "setup_env.sh: unknown option '$argument'; the only option is --with-mmdet" >&2
            exit 2
            ;;
    esac
done
if [[ "$WITH_MMDET" != 0 && "$WITH_MMDET" != 1 ]]; then
    echo "setup_env.sh: CODEC_WITH_MMDET is '$WITH_MMDET'; set it to 0 or 1" >&2
    exit 2
fi

cd "$REPO_ROOT"

STEP="start"
on_error() {
    local status=$?
    echo "" >&2
    echo "setup_env.sh: FAILED at step '$STEP' (exit code $status)." >&2
    echo "Fix the error above and re-run: bash tools/setup_env.sh" >&2
}
trap on_error ERR

WORK_DIR="$(mktemp -d)"
trap 'rm -rf "$WORK_DIR"' EXIT

step() {
    STEP="$1"
    echo ""
    echo "==> [$(date +%H:%M:%S), ${SECONDS}s] $STEP"
}

fail() {
    echo "setup_env.sh: FAILED at step '$STEP': $*" >&2
    exit 1
}

# Every pip call after the torch install passes this file, so that no
# dependency can replace torch or torchvision with another release (any
# other release is a download of several GB).
CONSTRAINTS="$WORK_DIR/torch-constraints.txt"
printf 'torch==%s\ntorchvision==%s\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" > "$CONSTRAINTS"

pip_install() {
    echo "pip install $*"
    "$VENV_PYTHON" -m pip install --quiet --disable-pip-version-check -c "$CONSTRAINTS" "$@"
}

detectron2_works() {
    "$VENV_PYTHON" -c "import detectron2; from detectron2.modeling import build_model; from detectron2.config import get_cfg" \
        >/dev/null 2>&1
}

# ---------------------------------------------------------------------------
step "check Python"
command -v "$PYTHON" >/dev/null || fail "interpreter '$PYTHON' not found; set PYTHON to a Python 3.10+ interpreter"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
    || fail "$("$PYTHON" --version 2>&1) is too old; codec-det needs Python 3.10 or newer (set PYTHON)"
echo "Using $("$PYTHON" --version 2>&1) at $(command -v "$PYTHON") on $(uname -m)"

# ---------------------------------------------------------------------------
step "create virtual environment"
if [[ -x "$VENV_PYTHON" ]] && "$VENV_PYTHON" -c 'import sys, pip; sys.exit(0 if sys.version_info >= (3, 10) else 1)' >/dev/null 2>&1; then
    echo "Reusing $VENV ($("$VENV_PYTHON" --version 2>&1))"
else
    if [[ -e "$VENV" ]]; then
        echo "$VENV exists but has no working Python 3.10+ with pip; recreating it"
    fi
    "$PYTHON" -m venv --clear "$VENV"
    echo "Created $VENV"
fi

# ---------------------------------------------------------------------------
step "install torch $TORCH_VERSION and torchvision $TORCHVISION_VERSION"
installed_torch="$("$VENV_PYTHON" - <<'EOF' 2>/dev/null || true
from importlib.metadata import version
print(version("torch"), version("torchvision"))
EOF
)"
if [[ "$installed_torch" == "$TORCH_VERSION $TORCHVISION_VERSION" ]]; then
    echo "Already installed: torch $TORCH_VERSION, torchvision $TORCHVISION_VERSION"
else
    pip_install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi
"$VENV_PYTHON" -c "import torch, torchvision; print('torch', torch.__version__, '/ torchvision', torchvision.__version__)"

# ---------------------------------------------------------------------------
step "install Detectron2"

install_detectron2_upstream() {
    # Returns non-zero, with the reason printed, when the source route is not
    # available here; the caller then takes the sal-detectron2 route.
    if ! command -v git >/dev/null; then
        UPSTREAM_FAILURE="git is not installed"
        return 1
    fi
    # Building compiles C++ and CUDA sources for minutes, so the short
    # timeout applies to reaching the repository, not to the build.
    if ! GIT_TERMINAL_PROMPT=0 timeout "$UPSTREAM_PROBE_TIMEOUT" \
            git ls-remote --exit-code "$DETECTRON2_GIT_URL" HEAD >/dev/null 2>&1; then
        UPSTREAM_FAILURE="upstream source not reachable: git ls-remote failed or timed out after ${UPSTREAM_PROBE_TIMEOUT}s"
        return 1
    fi
    # --no-build-isolation: the build needs the torch installed above.
    pip_install "setuptools<81" wheel
    if ! timeout "$UPSTREAM_BUILD_TIMEOUT" "$VENV_PYTHON" -m pip install --disable-pip-version-check \
            -c "$CONSTRAINTS" --no-build-isolation "git+$DETECTRON2_GIT_URL"; then
        UPSTREAM_FAILURE="building from the upstream source failed or took over ${UPSTREAM_BUILD_TIMEOUT}s"
        return 1
    fi
}

install_detectron2_sal() {
    # sal-detectron2 republishes Detectron2's Python sources as a cp310
    # wheel. pip rejects that wheel for Python 3.11 in a normal install, so
    # it is unpacked with --target and only its detectron2 package is copied:
    # the wheel's top-level tools/ folder would shadow any `tools` import.
    # Its compiled _C extension does not load on other Python versions. The
    # Python code runs without it, but without deformable convolution and
    # rotated boxes, and COCO evaluation must use pycocotools.
    local target="$WORK_DIR/sal-detectron2"
    "$VENV_PYTHON" -m pip install --disable-pip-version-check -c "$CONSTRAINTS" \
        --no-deps --only-binary=:all: --python-version 3.10 --implementation cp \
        --target "$target" "$SAL_DETECTRON2"
    [[ -d "$target/detectron2" ]] || fail "$SAL_DETECTRON2 has no detectron2 package folder"

    local site_packages
    site_packages="$("$VENV_PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    rm -rf "$site_packages/detectron2"
    cp -R "$target/detectron2" "$site_packages/detectron2"
    echo "Copied detectron2 from $SAL_DETECTRON2 into $site_packages"
}

if detectron2_works; then
    route="$(cat "$DETECTRON2_ROUTE_FILE" 2>/dev/null || echo "an earlier install")"
    echo "Detectron2: already installed (from $route)"
else
    UPSTREAM_FAILURE=""
    if install_detectron2_upstream; then
        route="the upstream source ($DETECTRON2_GIT_URL)"
        echo "Detectron2: installed from $route"
    else
        echo "Upstream Detectron2 route not taken: $UPSTREAM_FAILURE"
        install_detectron2_sal
        route="$SAL_DETECTRON2 sources"
        echo "Detectron2: installed from $route ($UPSTREAM_FAILURE)"
    fi
    echo "$route" > "$DETECTRON2_ROUTE_FILE"
fi

step "install Detectron2's dependencies"
pip_install "${DETECTRON2_DEPENDENCIES[@]}"

step "check Detectron2 imports"
"$VENV_PYTHON" -c "import detectron2; from detectron2.modeling import build_model; from detectron2.config import get_cfg; print('detectron2', detectron2.__version__, 'imports')" \
    || fail "Detectron2 was installed but does not import; see the traceback above"

# ---------------------------------------------------------------------------
step "install codec-det (editable, with test and export extras)"
pip_install -e "$REPO_ROOT[test,export]"

# ---------------------------------------------------------------------------
mmdet_works() {
    "$VENV_PYTHON" - "$MMCV_VERSION" "$MMDET_VERSION" >/dev/null 2>&1 <<'EOF'
import sys

import mmcv
import mmdet
from mmcv.ops import RoIAlign, nms  # noqa: F401, the compiled ops

sys.exit(0 if (mmcv.__version__, mmdet.__version__) == (sys.argv[1], sys.argv[2]) else 1)
EOF
}

if [[ "$WITH_MMDET" == 1 ]]; then
    step "install MMDetection $MMDET_VERSION with mmcv $MMCV_VERSION"
    if mmdet_works; then
        echo "Already installed: mmcv $MMCV_VERSION with its ops, mmdet $MMDET_VERSION"
    else
        # The last line the build script prints is the wheel's path.
        mmcv_wheel="$(bash "$REPO_ROOT/tools/build_mmcv_wheel.sh" "$VENV_PYTHON" | tail -n 1)"
        [[ -f "$mmcv_wheel" ]] || fail "tools/build_mmcv_wheel.sh printed no wheel path; see its output above"
        pip_install "$mmcv_wheel"
    fi
    pip_install -e "$REPO_ROOT[test,export,mmdet]"
    "$VENV_PYTHON" -c "import mmcv, mmdet, mmengine, codec_det.mmdet; print('mmcv', mmcv.__version__, '/ mmdet', mmdet.__version__, '/ mmengine', mmengine.__version__, 'import')" \
        || fail "MMDetection was installed but does not import; see the traceback above"
fi

# ---------------------------------------------------------------------------
step "fetch demo data"
"$VENV_PYTHON" -m codec_det.data.demo_fetch

# ---------------------------------------------------------------------------
STEP="done"
echo ""
echo "==> codec-det is set up in ${SECONDS}s"
echo "    venv:        $VENV"
echo "    torch:       $TORCH_VERSION, torchvision $TORCHVISION_VERSION"
echo "    Detectron2:  from $(cat "$DETECTRON2_ROUTE_FILE" 2>/dev/null || echo "$route")"
if [[ "$WITH_MMDET" == 1 ]]; then
    echo "    MMDetection: mmdet $MMDET_VERSION, mmcv $MMCV_VERSION"
fi
echo "    tests:       .venv/bin/python -m pytest -q"
