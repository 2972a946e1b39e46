#!/usr/bin/env bash
# Everything that needs a GPU, in one command: the GPU tests and every benchmark, with results in
# benchmarks/results/ (device, torch and triton versions inside each file). For a session that is
# lent a GPU for a short time: one call, then commit benchmarks/results/*cuda* and the log.
#
#   bash benchmarks/gpu_session.sh [RESULTS_DIR]      # default: benchmarks/results
#
# Assumes a Python with nextvlad installed (pip install -e ".[test]" with a CUDA build of torch).
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-benchmarks/results}
python=${PYTHON:-python}
mkdir -p "$results"
status=0
run() { echo "== $*"; "$@" || status=1; }

run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
run "$python" -m pytest -q -m gpu tests/ -p no:cacheprovider
run "$python" benchmarks/bench_aggregation.py --output-dir "$results"
for config in configs/nextvlad.yaml configs/nextvlad_mix3.yaml; do
  run "$python" benchmarks/bench_train.py --config "$config" --workers 8 --output-dir "$results" \
      $([ "$config" = configs/nextvlad_mix3.yaml ] && echo --mixture)
done
# the GPU machine's host CPU, kept apart from the 2-core results the README quotes
run "$python" benchmarks/bench_data.py --workers 0 4 8 --output-dir "$results/gpu_host"
exit $status
