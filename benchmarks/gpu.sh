#!/usr/bin/env bash
# The accelerator check, as one script that ends inside 8 minutes (run it through the device tool
# from the repository root, with .whl carried; results land in $OUT, or benchmarks/results).
#
# The lent machine has jax (with its CUDA plugin), flax, optax, orbax, chex and torch, and no
# network. medjax's other dependencies travel as wheels; make them once, here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl nibabel grain ml_collections pynrrd array_record
# then run:  bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
timeout 460 python3 benchmarks/gpu.py --out "$OUT" --budget-s 400
