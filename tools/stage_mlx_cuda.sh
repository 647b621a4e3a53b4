#!/usr/bin/env bash
# Stage MLX's CUDA build for the GPU machine (the `device` tool) in ONE carry-able file.
#
# The mlx + mlx-cuda-13 wheels unpack to ~167 MB, 67 MB of it device code for six GPU
# architectures. tools/prune_fatbin.py zeroes all but sm_90's (H100/H200) in place, so
# the tree compresses to ~21 MB: one device call carries it beside .whl (64 MiB a call),
# where ../shared/device/mlx-cuda-stage.sh's two parts need two calls on one warm machine.
# Writes .device/one/mlx.tar.xz (git-ignored via .git/info/exclude); then
#   run(carry=[".device/one", ".whl"], command="export OUT; bash benchmarks/gpu_measure.sh setup-8b ...")
#
# Usage: tools/stage_mlx_cuda.sh [MLX_VERSION]   (default 0.32.4)
set -euo pipefail
ver=${1:-0.32.4}
root=$(git rev-parse --show-toplevel)
cd "$root"
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_35_x86_64 -d "$tmp/whl" \
  "mlx==$ver" "mlx-cuda-13==$ver"
mkdir -p "$tmp/site"
for w in "$tmp"/whl/*.whl; do python3 -m zipfile -e "$w" "$tmp/site"; done
strip --strip-unneeded "$tmp/site/mlx/lib/libmlx.so"
python3 tools/prune_fatbin.py "$tmp/site/mlx/lib/libmlx.so" --keep 90
mkdir -p .device/one
tar -C "$tmp/site" -cf - . | xz -6 -T0 > .device/one/mlx.tar.xz
du -sh .device/one
