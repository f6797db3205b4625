#!/usr/bin/env bash
# Here, before spending device time: what bench/gpu.sh needs on the GPU machine, built
# into git-ignored folders that travel with `carry`: .gpu/ (Ray and friends, from
# ../shared/tools/gpu-bundle.sh, plus pytest, which that machine lacks) and .gpudata/ (a
# stratified sample of 12,017 real images). Then, on the device:
#   carry [".gpu", ".gpudata"], command:
#   source .gpu/gpu-env.sh && bash .gpudata/unpack.sh && bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash ../shared/tools/gpu-bundle.sh
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform any -d .gpu pytest iniconfig pluggy 2>&1 | grep -v '^WARNING' || true
bash ../shared/tools/gpu-data.sh "${1:-12000}"
du -sh --apparent-size .gpu .gpudata
