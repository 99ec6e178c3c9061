#!/usr/bin/env bash
# Build (or reuse) an mmcv 2.1.0 wheel with CPU ops for this venv's Python and torch.
#
#   bash tools/build_mmcv_wheel.sh [PYTHON]
#
# mmdet 3.3.0 requires mmcv<2.2.0, and mmcv 2.1.0 is published only as a
# source archive. That archive does not build as it is: its setup.py imports
# pkg_resources (removed in setuptools 81) and passes -std=c++17, while the
# torch 2.14 headers need C++20. This script downloads the archive, changes
# the flag to -std=c++20, builds the wheel against the venv's torch (no build
# isolation, so setuptools<81 must be in the venv) and caches it.
#
# The cache key is the Python tag, the torch version and the platform, because
# the compiled ops link against one torch build. A cached wheel is reused
# without building. The last line on stdout is the wheel's path; progress goes
# to stderr.
#
# Arguments:
#   PYTHON   interpreter of the target venv (default: .venv/bin/python in the repository root)
#
# Environment variables:
#   CODEC_WHEEL_CACHE   cache folder (default: ${XDG_CACHE_HOME:-$HOME/.cache}/codec-det/wheels)
#   MAX_JOBS            parallel compile jobs (default: the number of CPUs)
#
# The ops are built for the CPU only, also on machines with a GPU (the build
# hides it), so the cache key stays valid on any machine with this Python and
# torch. NOTE: MMDetection's R-CNN heads run mmcv's RoIAlign and nms, so
# training on a GPU needs an mmcv built with its CUDA ops, which this script
# does not build. On 2 cores the build took 401 s when idle and 938 s when busy.
set -Eeuo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${1:-$REPO_ROOT/.venv/bin/python}"
MMCV_VERSION="2.1.0"
CACHE_ROOT="${CODEC_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/codec-det/wheels}"

log() {
    echo "build_mmcv_wheel.sh: $*" >&2
}

fail() {
    log "FAILED: $*"
    exit 1
}

[[ -x "$PYTHON" ]] || fail "interpreter '$PYTHON' not found; pass the venv's python as the first argument or run tools/setup_env.sh first"
"$PYTHON" -c "import torch" 2>/dev/null \
    || fail "torch does not import with $PYTHON; install torch in that venv first (tools/setup_env.sh does)"

# cp311-torch2.14.1+cu130-linux_x86_64-cpuops, for example.
KEY="$("$PYTHON" - <<'EOF'
import sys
import sysconfig

import torch

python_tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
platform_tag = sysconfig.get_platform().replace("-", "_").replace(".", "_")
print(f"{python_tag}-torch{torch.__version__}-{platform_tag}-cpuops")
EOF
)"
CACHE_DIR="$CACHE_ROOT/mmcv-$MMCV_VERSION/$KEY"
mkdir -p "$CACHE_DIR"

find_cached_wheel() {
    find "$CACHE_DIR" -maxdepth 1 -name "mmcv-$MMCV_VERSION-*.whl" -print -quit
}

# Two set-up runs on one machine would otherwise build the same wheel twice.
exec 9>"$CACHE_DIR/.build.lock"
if ! flock -n 9; then
    log "another build holds $CACHE_DIR/.build.lock; waiting for it"
    flock 9
fi

cached="$(find_cached_wheel)"
if [[ -n "$cached" ]]; then
    log "reusing cached wheel $cached"
    echo "$cached"
    exit 0
fi

# mmcv's setup.py imports pkg_resources; setuptools 81 removed it.
if ! "$PYTHON" -c "import pkg_resources" >/dev/null 2>&1; then
    log "installing setuptools<81 into the venv (mmcv's setup.py imports pkg_resources)"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check "setuptools<81"
fi

WORK_DIR="$(mktemp -d)"
trap 'rm -rf "$WORK_DIR"' EXIT

log "downloading the mmcv $MMCV_VERSION source archive"
# --no-build-isolation: pip reads the archive's metadata by running its
# setup.py, which needs pkg_resources and torch from the venv.
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-build-isolation \
    --no-binary :all: --no-deps "mmcv==$MMCV_VERSION" -d "$WORK_DIR"
archive="$WORK_DIR/mmcv-$MMCV_VERSION.tar.gz"
[[ -f "$archive" ]] || fail "pip download did not produce $archive"
tar -xzf "$archive" -C "$WORK_DIR"
SOURCE_DIR="$WORK_DIR/mmcv-$MMCV_VERSION"

grep -q -- "-std=c++17" "$SOURCE_DIR/setup.py" \
    || fail "mmcv $MMCV_VERSION's setup.py has no -std=c++17 flag to replace; the source archive differs from the one this script was written for"
sed -i 's/-std=c++17/-std=c++20/g' "$SOURCE_DIR/setup.py"

log "building mmcv $MMCV_VERSION with CPU ops (MAX_JOBS=${MAX_JOBS:-$(nproc)}); this takes 7 to 16 minutes on 2 cores"
start=$SECONDS
# A CFLAGS variable replaces Python's own compile flags (-O3 -DNDEBUG ...)
# instead of adding to them, so the build passes Python's flags with -g
# swapped for -g0. That and --strip-debug leave out the debug info: the
# wheel was 1.4 MB with torch 2.14.1 on x86_64.
build_cflags="$("$PYTHON" -c "import sysconfig; print(' '.join('-g0' if flag == '-g' else flag for flag in sysconfig.get_config_var('CFLAGS').split()))")"
# CUDA_VISIBLE_DEVICES= hides any GPU so that setup.py selects the CPU ops.
CUDA_VISIBLE_DEVICES="" FORCE_CUDA=0 MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    CFLAGS="$build_cflags" LDFLAGS="-Wl,--strip-debug" \
    "$PYTHON" -m pip wheel --disable-pip-version-check --no-build-isolation --no-deps \
    -w "$WORK_DIR/dist" "$SOURCE_DIR" >&2
built="$(find "$WORK_DIR/dist" -maxdepth 1 -name "mmcv-$MMCV_VERSION-*.whl" -print -quit)"
[[ -n "$built" ]] || fail "pip wheel finished without an mmcv-$MMCV_VERSION wheel in $WORK_DIR/dist"
log "built $(basename "$built") ($(du -h "$built" | cut -f1)) in $((SECONDS - start))s"

# Copy under a temporary name, then rename, so that the cache never contains
# a partly written wheel.
target="$CACHE_DIR/$(basename "$built")"
cp "$built" "$target.tmp"
mv "$target.tmp" "$target"
log "cached $target"
echo "$target"
