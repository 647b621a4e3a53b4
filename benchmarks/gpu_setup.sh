# Source on the GPU machine (device tool): unpack the staged MLX CUDA build and the carried
# wheels, then build the benchmark fixtures. See benchmarks/RESULTS.md.
set -e
if [ ! -d /tmp/mlxsite/mlx ]; then
  mkdir -p /tmp/mlxsite
  cat /tmp/mlxstage/part.aa .device/b/part.ab | xz -d | tar -C /tmp/mlxsite -x
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING || true
export PYTHONPATH=/tmp/mlxsite:/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -c 'import mlx.core as mx; print(mx.default_device(), mx.__version__)'
python3 tests/make_fixtures.py gpt2-small-shape smollm2-135m-shape
