#!/usr/bin/env bash
# Everything that needs a GPU, in one command of at most 6.7 minutes (400 s of stage budgets), for a session lent the GPU
# machine for a short time (benchmarks/README.md gives the exact device call). Stages, each under
# its own time budget so that one slow stage cannot eat the others:
#
#   setup     install the carried wheels (.whl/, from fetch_gpu_wheels.sh) with --no-deps --target,
#             then the project itself (editable, no deps, no build isolation) unless importable
#   versions  GPU, driver, python, torch, CUDA, triton, lightning, matmul precision
#   ceilings  measured copy GB/s and bf16 GEMM TFLOP/s (benchmarks/ceilings.py), first
#   tests     the GPU tests (pytest -m gpu)
#   kernel    kernel benchmark vs the eager / torch.compile reference, TARGET lines
#   model     roofline times over the measured ceilings, and the static kernel model's
#             predictions (benchmarks/kernel_model.py, if present)
#   train     training throughput, paper model: model only, cost split, end to end (8 workers), MFU
#   mix3      training throughput, final-recipe mixture: model only, 1 vs 3 branches, MFU
#   optimizer the optimizer step of the paper model: clip + TF1Adam, fused vs foreach, GB/s
#
# Results land in RESULTS_DIR (default benchmarks/results; with --dry-run a scratch folder) and,
# with the log and a summary of every TARGET line, in $OUT as at most 8 files:
#   session.log, summary.md, results.tar.gz (every result file this run wrote).
#
#   bash benchmarks/gpu_session.sh [--dry-run] [--results RESULTS_DIR]
#
# --dry-run runs every stage's CPU fallback (tiny shapes, Triton interpreter) in under 2 minutes;
# tests/test_gpu_session.py runs it in CI.
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=0
results=""
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) dry_run=1; shift ;;
    --results) results=$2; shift 2 ;;
    *) echo "usage: $0 [--dry-run] [--results DIR]" >&2; exit 2 ;;
  esac
done
out=${OUT:-$(mktemp -d -t gpu_session_out.XXXXXX)}
staging=$(mktemp -d -t gpu_session_results.XXXXXX)  # this run's result files, packed for $OUT
started_marker=$(mktemp -t gpu_session_start.XXXXXX)
if [ -z "$results" ]; then
  if [ $dry_run = 1 ]; then results=$staging; else results=benchmarks/results; fi
fi
mkdir -p "$out" "$results"
log=$out/session.log
exec > >(tee "$log") 2>&1
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# The image's own matmul and compile caches start empty; keep Inductor's in one place per run.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/nextvlad_inductor}
declare -a stage_lines=()
status=0
started=$(date +%s)

# stage NAME BUDGET_SECONDS COMMAND...: runs COMMAND under `timeout`, records its exit status.
stage() {
  local name=$1 budget=$2
  shift 2
  echo
  echo "=== stage $name (budget ${budget}s): $*"
  local begin=$(date +%s)
  # through bash -c, so that a stage may be one of the functions below (exported)
  timeout --kill-after=10 "$budget" bash -c '"$@"' stage "$@"
  local code=$?
  local took=$(( $(date +%s) - begin ))
  local verdict=ok
  if [ $code = 124 ] || [ $code = 137 ]; then verdict="TIMED OUT"; elif [ $code != 0 ]; then verdict="failed ($code)"; fi
  [ $code = 0 ] || status=1
  echo "=== stage $name: $verdict after ${took}s"
  stage_lines+=("| $name | $budget | $took | $verdict |")
}

setup() {
  if [ $dry_run = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
    # --target keeps the image's own packages untouched; --no-deps: the image has the rest.
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/nextvlad_site .whl/*.whl || return 1
  else
    echo "no carried wheels installed (dry run, or no .whl/ folder): using the installed packages"
  fi
  local check="import nextvlad.cli, nextvlad.data, nextvlad.kernels; print('nextvlad imports')"
  "$python" -c "$check" 2>/dev/null && return 0
  "$python" -m pip install -q --no-deps --no-build-isolation -e . && "$python" -c "$check"
}

versions() {
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
    --format=csv
  "$python" - <<'PY'
import platform, torch
import jsonargparse, lightning
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = None
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton_version}, lightning {lightning.__version__}, jsonargparse {jsonargparse.__version__}")
if torch.cuda.is_available():
    properties = torch.cuda.get_device_properties(0)
    print(f"GPU {properties.name}: {properties.multi_processor_count} SMs, {properties.total_memory / 2**30:.0f} GiB")
print(f"float32 matmul precision (benchmarks set their own): {torch.get_float32_matmul_precision()}")
PY
}

# The predictions beside the measurements: roofline times over the measured ceilings, and the
# static kernel model (benchmarks/kernel_model.py, another issue's) where it has landed.
kernel_model() {
  local ceilings_args=()
  [ -f "$ceilings" ] && ceilings_args=(--ceilings "$ceilings")
  "$python" benchmarks/bench_aggregation.py --roofline "${ceilings_args[@]}" --name aggregation_roofline_measured \
    --output-dir "$results" || return 1
  if [ -f benchmarks/kernel_model.py ]; then
    # The headline case only (video K=128 bf16: three sm_90 compiles, about 7 s with a cold Triton
    # cache; all shapes take minutes), measured beside predicted on a GPU, into $results; both
    # lengths, so that the backward's tail runs (NOTES.md, change 12) are timed against head runs only
    # and its L2 prefetch (change 17) against none (one more compile of the backward).
    "$python" benchmarks/kernel_model.py --streams video --clusters 128 --dtypes bf16 --lengths full 120-300 \
      --output-dir "$results" --name kernel_model_measured
  else
    echo "benchmarks/kernel_model.py not present: no static predictions to print"
  fi
}

export -f setup versions kernel_model
export python dry_run results

if [ $dry_run = 1 ]; then
  echo "DRY RUN on the CPU: every stage's fallback, tiny shapes; no number here is a GPU number"
  export PYTHONPATH=${PYTHONPATH:-}
  device=(--device cpu)
else
  export PYTHONPATH=/tmp/nextvlad_site${PYTHONPATH:+:$PYTHONPATH}
  device=()
fi
ceilings=$results/ceilings_$([ $dry_run = 1 ] && echo cpu || echo cuda).json
# The later stages judge against the measured ceilings when that stage wrote them.
with_ceilings() { if [ -f "$ceilings" ]; then "$@" --ceilings "$ceilings"; else "$@"; fi; }
export -f with_ceilings
export ceilings

stage setup 30 setup
stage versions 15 versions
if [ $dry_run = 1 ]; then
  stage ceilings 20 "$python" benchmarks/ceilings.py "${device[@]}" --copy-mib 8 --gemm-size 128 --output-dir "$results"
  stage tests 40 "$python" -m pytest -q -m gpu tests/test_residual_aggregation.py -p no:cacheprovider
  stage kernel 40 with_ceilings env TRITON_INTERPRET=1 "$python" benchmarks/bench_aggregation.py --quick \
    "${device[@]}" --threads 1 --providers reference triton --output-dir "$results" --no-plot
  stage model 30 kernel_model
  stage train 60 with_ceilings "$python" benchmarks/bench_train.py --tiny --cost-split "${device[@]}" \
    --output-dir "$results"
  stage mix3 40 with_ceilings "$python" benchmarks/bench_train.py --tiny --config configs/nextvlad_mix3.yaml \
    --no-end-to-end "${device[@]}" --output-dir "$results"
  stage optimizer 20 "$python" benchmarks/bench_optimizer.py --tiny "${device[@]}" --output-dir "$results"
else
  stage ceilings 25 "$python" benchmarks/ceilings.py --output-dir "$results"
  stage tests 80 "$python" -m pytest -q -m gpu tests/ -p no:cacheprovider
  stage kernel 120 with_ceilings "$python" benchmarks/bench_aggregation.py --output-dir "$results"
  stage model 30 kernel_model
  stage train 55 with_ceilings "$python" benchmarks/bench_train.py --config configs/nextvlad.yaml --workers 8 \
    --warmup 2 --steps 8 \
    --cost-split --output-dir "$results"
  stage mix3 30 with_ceilings "$python" benchmarks/bench_train.py --config configs/nextvlad_mix3.yaml --mixture \
    --no-end-to-end --output-dir "$results"
  stage optimizer 15 "$python" benchmarks/bench_optimizer.py --output-dir "$results"
fi

elapsed=$(( $(date +%s) - started ))
{
  echo "# GPU session $([ $dry_run = 1 ] && echo '(DRY RUN on the CPU: not GPU numbers)')"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), ${elapsed}s in all; results in $results"
  echo
  echo "| stage | budget s | took s | result |"
  echo "|---|---|---|---|"
  printf '%s\n' "${stage_lines[@]}"
  echo
  echo "## Targets"
  echo
  targets=$(grep -a '^TARGET ' "$log" | sed 's/^/- /')
  echo "${targets:-(no TARGET line printed)}"
} > "$out/summary.md"
[ "$results" = "$staging" ] || find "$results" -maxdepth 1 -type f -newer "$started_marker" -exec cp -p {} "$staging"/ \;
rm -f "$started_marker"
tar -czf "$out/results.tar.gz" -C "$staging" .
cat "$out/summary.md"
echo "wrote $out/session.log, $out/summary.md and $out/results.tar.gz"
exit $status
