#!/usr/bin/env bash
# Here, before spending device time: what the GPU machine lacks, built into git-ignored
# folders that travel with `carry` (one call carries at most 64 MiB):
#   .gpu/     Ray and friends, from ../shared/tools/gpu-bundle.sh (~51 MB)
#   .gpux/    wheels the project needs beyond that (matplotlib for its plots, pytest),
#             installed there only where missing (~18 MB)
#   .gpudata/ real images: a stratified sample of N (default 12000, ~11 MB), or "all" (~34 MB)
#
# Usage: bash bench/gpu-prep.sh [N|all]. Then, on the device, two calls back to back
# (the machine keeps /tmp while warm, ~30 s after a call):
#   1. carry [".gpudata", ".gpux"]: bash .gpudata/unpack.sh && bash .gpux/install.sh
#   2. carry [".gpu"]:  source .gpu/gpu-env.sh && test -f /tmp/fashion-small/styles.csv && bash bench/gpu.sh
#      (or bash bench/gpu-recipe.sh for the scratch recipe on all the images)
set -euo pipefail
cd "$(dirname "$0")/.."
tools=$(cd ../shared/tools && pwd)  # the bundle script finds gpu-env.sh beside itself
bash "$tools/gpu-bundle.sh"
rm -f .gpu/py_spy-*.whl  # a profiler binary (3 MB) nothing here runs
rm -rf .gpux && mkdir -p .gpux
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform any -d .gpux matplotlib contourpy cycler fonttools kiwisolver pyparsing pytest iniconfig pluggy \
  2>&1 | grep -v '^WARNING' || true
cat > .gpux/install.sh <<'SH'
#!/usr/bin/env bash
# On the GPU machine: install into /tmp/site (gpu-env.sh puts it on PYTHONPATH) what its
# Python lacks; a package it already has is left to it.
set -e; cd "$(dirname "$0")"; mkdir -p /tmp/site
for m in matplotlib pytest; do
  python3 -c "import $m" 2>/dev/null && { echo "gpux: $m already there"; continue; }
  case $m in
    matplotlib) whls="matplotlib-* contourpy-* cycler-* fonttools-* kiwisolver-* pyparsing-*" ;;
    pytest) whls="pytest-* iniconfig-* pluggy-*" ;;
  esac
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $whls 2>&1 | grep -v WARNING | tail -3
  echo "gpux: $m installed"
done
SH
bash ../shared/tools/gpu-data.sh "${1:-12000}" | tail -1
du -sh --apparent-size .gpu .gpux .gpudata
