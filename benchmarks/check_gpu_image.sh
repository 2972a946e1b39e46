#!/usr/bin/env bash
# Proves the wheel list of fetch_gpu_wheels.sh complete without the GPU machine: builds a venv that
# holds only the image's packages (benchmarks/gpu_image_packages.txt, at the versions this checkout's
# .venv resolved, Triton at the image's 3.6.0), installs the fetched wheels and the project exactly
# as gpu_session.sh does, then imports every module of the package and of benchmarks/. The same
# venv runs the offline sm_90 compile report and the static kernel model under Triton 3.6
# (--compile-report).
#
#   bash benchmarks/check_gpu_image.sh [VENV]          # default .venv-gpuimage (ignored by git)
#   bash benchmarks/check_gpu_image.sh VENV --compile-report
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-gpuimage}
repo=$(pwd)
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  # The image's packages that the project's dependency closure holds, at .venv's versions; torch
  # stays the local CPU build (no torch 2.11 CPU wheel here): the import check does not depend on it.
  .venv/bin/python -m pip list --format=freeze 2>/dev/null | python3 -c '
import re, sys
image = {re.sub(r"[-_.]+", "-", line.strip().lower()) for line in open("benchmarks/gpu_image_packages.txt")
         if line.strip() and not line.startswith("#")}
for line in sys.stdin:
    name, version = line.strip().split("==")
    if re.sub(r"[-_.]+", "-", name.lower()) in image:
        print("triton==3.6.0" if name.lower() == "triton" else f"{name}=={version}")
' > "$venv/image-requirements.txt"
  "$venv/bin/python" -m pip install -q --no-deps -r "$venv/image-requirements.txt"
fi
version=$("$venv/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
wheels=$(mktemp -d)
PYTHON="$venv/bin/python" bash benchmarks/fetch_gpu_wheels.sh --python-version "$version" --dest "$wheels" >/dev/null
site="$venv/carried-site"
rm -rf "$site"
"$venv/bin/python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
"$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
rm -rf "$wheels"
export PYTHONPATH="$(cd "$site" && pwd)"  # VENV may be relative or absolute
unset TRITON_INTERPRET
"$venv/bin/python" - <<'PY'
import importlib, pathlib, pkgutil, sys
import nextvlad
sys.path.insert(0, "benchmarks")
import nextvlad.kernels
names = [m.name for m in pkgutil.walk_packages(nextvlad.__path__, "nextvlad.")]
names += ["nextvlad.kernels"] + [m.name for m in pkgutil.walk_packages(nextvlad.kernels.__path__, "nextvlad.kernels.")]
names += [p.stem for p in sorted(pathlib.Path("benchmarks").glob("*.py"))]
failed = []
for name in names:
    try:
        importlib.import_module(name)
    except Exception as error:  # report every missing module, not just the first
        failed.append(f"{name}: {type(error).__name__}: {error}")
import torch, triton
print(f"imported {len(names) - len(failed)}/{len(names)} modules (torch {torch.__version__}, triton {triton.__version__})")
print("\n".join(failed))
sys.exit(1 if failed else 0)
PY
shift || true
if [ "${1:-}" = --compile-report ]; then
  "$venv/bin/python" benchmarks/bench_aggregation.py --compile-report --name aggregation_sm90_compile_triton36 \
      --output-dir benchmarks/results
  # the static model on Triton 3.6's SASS: what the GPU image will run (kernel_model.md is 3.9's)
  "$venv/bin/python" benchmarks/kernel_model.py --no-measure --name kernel_model_triton36 --output-dir benchmarks/results
fi
