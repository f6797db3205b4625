# Sourced by bench/gpu.sh and bench/gpu-recipe.sh, from the project root: the Python to
# use (the venv here, the system's on the GPU machine) and where the images are
# (FASHION_SMALL, else .gpudata's /tmp/fashion-small, else ../shared's copy).
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
DATA=${FASHION_SMALL:-/tmp/fashion-small}
[ -f "$DATA/styles.csv" ] || DATA=../shared/data/fashion-small
[ -f "$DATA/styles.csv" ] || { echo "$(basename "$0"): no images: unpack .gpudata or set FASHION_SMALL" >&2; exit 2; }
