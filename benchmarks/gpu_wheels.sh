#!/usr/bin/env bash
# Gather the wheels benchmarks/gpu_check.py needs on a GPU machine without network that has Python 3.12, torch and
# transformers already (run it here, with network): autocompress's other dependencies as Python 3.12 wheels, and
# llama.cpp's libggml-base.so alone (GGUF blocks through llama.cpp's own quantizer), not llama-cpp-python's 23 MiB
# wheel.
#
#     benchmarks/gpu_wheels.sh [FOLDER]      # default: gpu-wheels/ (git ignores it: add it to what you carry)
#
# pandas and matplotlib stay behind: only the study's reports (trials.csv, plots) need them, and the check writes
# none. The folder must stay within 64 MiB; the script prints its size and fails above that.
set -euo pipefail
folder="${1:-gpu-wheels}"
python="${PYTHON:-python3}"
mkdir -p "$folder"
# --no-deps: this list is the closure of what torch and transformers do not bring (pydantic's, optuna's and
# compressed-tensors' own dependencies named one by one)
"$python" -m pip download --only-binary :all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
  --no-deps --dest "$folder" \
  optuna alembic Mako SQLAlchemy colorlog \
  pydantic pydantic-core annotated-types typing-inspection \
  gguf compressed-tensors loguru psutil
# llama-cpp-python builds from source here; take the one library the quantizer loads from its installed package
library=$("$python" - <<'PY' 2>/dev/null || true
import importlib.util, pathlib
spec = importlib.util.find_spec("llama_cpp")
if spec and spec.origin:
    found = sorted(pathlib.Path(spec.origin).parent.rglob("libggml-base.so*"))
    print(found[0] if found else "")
PY
)
if [ -n "$library" ]; then
  # where autocompress looks for it (<llama_cpp package>/lib/): benchmarks/gpu_check.sh puts ggml/ on PYTHONPATH,
  # where llama_cpp/ is a folder that holds the library alone, not llama-cpp-python
  mkdir -p "$folder/ggml/llama_cpp/lib"
  cp "$library" "$folder/ggml/llama_cpp/lib/libggml-base.so"
else
  echo "gpu_wheels: llama-cpp-python is not installed here: no libggml-base.so (GGUF blocks use the numpy port)" >&2
fi
bytes=$(du -sb "$folder" | cut -f1)
echo "gpu_wheels: $(ls "$folder" | wc -l) files, $((bytes / 1048576)) MiB in $folder"
if [ "$bytes" -gt $((64 * 1048576)) ]; then
  echo "gpu_wheels: over the 64 MiB that may be carried" >&2
  exit 1
fi
