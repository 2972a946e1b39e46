#!/usr/bin/env bash
# Download into .whl/ (ignored by git) the wheels the GPU machine's image lacks, for its Python
# (3.12, x86-64 manylinux). The image cannot reach a registry; gpu_session.sh installs these with
# `pip install --no-deps --target`. The list is what importing every module of the package needs
# beyond the image's own packages (benchmarks/gpu_image_packages.txt); check_gpu_image.sh proves it
# complete by importing everything in a venv that holds only the image's packages plus these.
#
#   bash benchmarks/fetch_gpu_wheels.sh [--python-version 3.12] [--dest .whl]
set -euo pipefail
cd "$(dirname "$0")/.."
python_version=3.12
dest=.whl
while [ $# -gt 0 ]; do
  case $1 in
    --python-version) python_version=$2; shift 2 ;;
    --dest) dest=$2; shift 2 ;;
    *) echo "usage: $0 [--python-version X.Y] [--dest DIR]" >&2; exit 2 ;;
  esac
done
python=${PYTHON:-python3}

# name==version, and who needs it (versions: the ones `make install` resolves, so CPU and GPU agree)
pure_python=(
  jsonargparse==4.53.0      # LightningCLI (nextvlad.cli)
  docstring_parser==0.18.0  # jsonargparse[signatures]
  typeshed_client==2.15.0   # jsonargparse[signatures]
  tzdata==2026.6            # python-dateutil >= 3 (harmless where the image's dateutil needs none)
  torchdata==0.11.0         # StatefulDataLoader (nextvlad.data.dataset: exact mid-epoch resume)
  setuptools==84.2.1        # builds the editable install: pyproject's SPDX license needs >= 77
)
binary=(
  google-crc32c==1.9.0      # TFRecord CRCs (nextvlad.data.records)
  crc32c==2.9.post0         # tfrecord's own CRC module
)
sdist_only=(tfrecord==1.14.6)  # published as an sdist only: built into a (pure-Python) wheel here

mkdir -p "$dest"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
           manylinux_2_5_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" \
  --implementation cp "${platforms[@]}" -d "$dest" "${pure_python[@]}" "${binary[@]}"
"$python" -m pip wheel -q --no-deps -w "$dest" "${sdist_only[@]}"
ls -1 "$dest"
