#!/usr/bin/env bash
# On a GPU machine without network (Python 3.12, torch and transformers preinstalled): install the wheels that
# benchmarks/gpu_wheels.sh gathered, without their dependencies and without an index, then run the check.
#
#     benchmarks/gpu_check.sh [FOLDER] [gpu_check.py's options]   # FOLDER: default gpu-wheels/
set -euo pipefail
cd "$(dirname "$0")/.."
folder="gpu-wheels"
if [ $# -gt 0 ] && [ -d "$1" ]; then
  folder="$1"
  shift
fi
python="${PYTHON:-python3}"
if compgen -G "$folder/*.whl" > /dev/null; then
  "$python" -m pip install --quiet --no-deps --no-index "$folder"/*.whl
fi
path="$PWD"
if [ -d "$folder/ggml" ]; then  # llama.cpp's libggml-base.so where autocompress looks: <llama_cpp>/lib/
  path="$path:$(cd "$folder/ggml" && pwd)"
fi
PYTHONPATH="$path${PYTHONPATH:+:$PYTHONPATH}" exec "$python" benchmarks/gpu_check.py "$@"
