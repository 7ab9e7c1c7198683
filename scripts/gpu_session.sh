#!/usr/bin/env bash
# The one device run of a session that is lent a GPU (issue 4's GPU check).
#
# 1. Here, on the CPU machine (package registries reachable), once per checkout:
#        bash scripts/gpu_session.sh --fetch-wheels
#    downloads what the GPU image lacks into .whl/ (ignored by git): numpy<2.4 (Triton
#    3.6 there breaks with numpy >= 2.4) and liger-kernel (the public fused
#    implementation the fused log-probs are compared with). Both are small.
# 2. Through the device tool, from the repository root:
#        run(command="bash scripts/gpu_session.sh", carry=[".whl"], timeout_s=480)
#    It installs the wheels into /tmp/site, records the card, and runs
#    benchmarks/gpu_check.py (build of riskfast._C with its CUDA ops, GPU tests, timings
#    of the Triton kernels and of RLR's CUDA ops; < 5 min on an H100), writing
#    gpu_check.md, gpu_check.json (with "rlr_stream": how the CUDA noise stream compares
#    with the CUDA and CPU references, in ulps) and the whole log under $OUT.
# 3. Copy the table into benchmarks/RESULTS.md with the card, the date and the commit.
#
# Extra arguments are passed to gpu_check.py (e.g. --no-build --no-compile --reps 5).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--fetch-wheels" ]; then
  rm -rf .whl && mkdir -p .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "numpy>=2.0,<2.4" "liger-kernel==0.8.5" || exit 1
  ls -l .whl
  exit 0
fi

out="${OUT:-riskfast_out/gpu}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "gpu_session: no .whl/ wheels (run --fetch-wheels here first); going on without them"
fi
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  git rev-parse HEAD 2>/dev/null || echo "commit: unknown here (record the one the run was sent from)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
} 2>&1 | tee "$out/machine.txt"
PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
